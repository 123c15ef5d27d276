"""The tiny expert of tests/experts, for the command-line tests."""

from tests.experts.conftest import char_base, char_folder, expert_file, trained_manifest

__all__ = ["char_base", "char_folder", "expert_file", "trained_manifest"]
