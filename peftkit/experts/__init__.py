"""Experts: one self-describing file holding soft prompts, adapters, decoding settings and runtime hints.

* :mod:`~peftkit.experts.manifest` — the manifest (pydantic) and its JSON Schema (:mod:`.schema`);
* :mod:`~peftkit.experts.package` — ``NAME-VERSION.expert`` archives: write, inspect;
* :mod:`~peftkit.experts.archive` — safe reading: paths, links, sizes, checksums;
* :mod:`~peftkit.experts.validate` — every field's status (applied / unsupported / error);
* :mod:`~peftkit.experts.load` — an expert onto its base model, fingerprint checked;
* :mod:`~peftkit.experts.train` — ``peftkit train MANIFEST``.
"""

from peftkit.experts.manifest import ExpertManifest, ManifestError, load_manifest, parse_manifest

__all__ = ["ExpertManifest", "ManifestError", "load_manifest", "parse_manifest"]
