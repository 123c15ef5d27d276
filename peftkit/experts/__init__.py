"""peftkit.experts: many experts per adapter, and experts as self-describing files.

Banks and routing (``docs/experts.md``):

* :mod:`~peftkit.experts.bank` — a table of experts in one adapter, ids ↔ rows;
* :mod:`~peftkit.experts.routes` — per-row routes (adapter → expert) for forward and generate;
* :mod:`~peftkit.experts.hierarchy` — per-row fallback persona → cluster → unified → base;
* :mod:`~peftkit.experts.bank_files` — one expert as a PEFT folder; a bank from many folders.

Expert files (``docs/expert-packages.md``):

* :mod:`~peftkit.experts.manifest` — the manifest (pydantic) and its JSON Schema (:mod:`.schema`);
* :mod:`~peftkit.experts.package` — ``NAME-VERSION.expert`` archives: write, inspect;
* :mod:`~peftkit.experts.archive` — safe reading: paths, links, sizes, checksums;
* :mod:`~peftkit.experts.validate` — every field's status (applied / unsupported / error);
* :mod:`~peftkit.experts.load` — an expert onto its base model, fingerprint checked;
* :mod:`~peftkit.experts.train` — ``peftkit train MANIFEST``.
"""

from peftkit.experts.bank import ExpertBank, ExpertIndex, expert_row, has_expert, num_experts
from peftkit.experts.bank_files import bank_from_folders, export_expert
from peftkit.experts.hierarchy import BASE_LEVEL, ExpertHierarchy, Resolution
from peftkit.experts.manifest import ExpertManifest, ManifestError, load_manifest, parse_manifest
from peftkit.experts.routes import ExpertRoute, ExpertRoutes, expert_routes

__all__ = [
    "BASE_LEVEL",
    "ExpertBank",
    "ExpertHierarchy",
    "ExpertIndex",
    "ExpertManifest",
    "ExpertRoute",
    "ExpertRoutes",
    "ManifestError",
    "Resolution",
    "bank_from_folders",
    "expert_routes",
    "expert_row",
    "export_expert",
    "has_expert",
    "load_manifest",
    "num_experts",
    "parse_manifest",
]
