"""peftkit.experts: many experts per adapter (banks), per-row routes, fallback, bank files.

See ``docs/experts.md``.
"""

from peftkit.experts.bank import ExpertBank, ExpertIndex, expert_row, has_expert, num_experts
from peftkit.experts.bank_files import bank_from_folders, export_expert
from peftkit.experts.hierarchy import BASE_LEVEL, ExpertHierarchy, Resolution
from peftkit.experts.routes import ExpertRoute, ExpertRoutes, expert_routes

__all__ = [
    "BASE_LEVEL",
    "ExpertBank",
    "ExpertHierarchy",
    "ExpertIndex",
    "ExpertRoute",
    "ExpertRoutes",
    "Resolution",
    "bank_from_folders",
    "expert_routes",
    "expert_row",
    "export_expert",
    "has_expert",
    "num_experts",
]
