"""The key every stage passes around: which model's embeddings of which dataset under which condition."""

from __future__ import annotations

from dataclasses import dataclass

CLEAN = "clean"


@dataclass(frozen=True, order=True)
class RunKey:
    """One (model, dataset, condition) run: the unit that is embedded, indexed and analysed."""

    model: str
    dataset: str
    condition: str = CLEAN

    def __str__(self) -> str:
        return f"{self.model} on {self.dataset}/{self.condition}"

    @property
    def clean(self) -> RunKey:
        """The same model and dataset without overlay: what every overlay figure is read against."""
        return RunKey(self.model, self.dataset, CLEAN)

    def cli_args(self) -> str:
        """The ``-m -d -c`` arguments naming this run, for the commands error messages suggest."""
        return f"--model {self.model} --dataset {self.dataset} --condition {self.condition}"
