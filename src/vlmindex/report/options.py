"""What a report is asked for (:class:`ReportOptions`) and what writing one gave (:class:`ReportResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmindex.errors import VlmindexError

PROJECTIONS = ("tsne", "pca")


@dataclass(frozen=True)
class ReportOptions:
    dataset: str | None = None
    max_points: int = 1500  # per model panel, all conditions together; 0 leaves projections out
    projection: str = "tsne"  # "tsne" or "pca"; tiny sets always use PCA
    n_boot: int = 2000
    confidence: float = 0.95
    alpha: float = 0.05  # family-wise error rate of the Holm-corrected comparisons
    seed: int = 0
    duplicate_pairs: int = 12  # top duplicate pairs shown per dataset (cross-split first, then by score)
    confused_queries: int = 4  # per model and dataset: lowest purity@k queries shown with their neighbours

    def check(self) -> None:
        """Raise on options no report can be made with (the CLI's choices already exclude them)."""
        if self.projection not in PROJECTIONS:
            raise VlmindexError(f"unknown projection {self.projection!r}; choose tsne or pca")
        if self.n_boot < 1:
            raise VlmindexError(f"bootstrap replicates must be at least 1, got {self.n_boot}")


@dataclass
class ReportResult:
    path: Path
    n_analyses: int
    datasets: list[str]
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
