"""Tolerances per tensor group, shared by ``parity`` (the ``atol``/``passed`` columns) and ``gate``."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

GROUPS = ("logits", "hidden_states", "block_taps", "routing", "decode_logits", "greedy_tokens")
# Groups judged by agreement, not by a difference: any disagreement outside a near tie fails.
EXACT_GROUPS = ("routing", "greedy_tokens")
ROUTING_TAP = "expert_indices"
_BLOCK = re.compile(r"^block_(\d+)_(.+)$")
_HIDDEN = re.compile(r"^hidden_state_(\d+)$")

_HELP = {
    "logits": "max |diff| for logits",
    "hidden_states": "hidden states",
    "block_taps": "per-block taps",
    "decode_logits": "logits of each generation step",
    "near_tie_margin": "a routing (or greedy token) disagreement counts only where the k-th and (k+1)-th router "
    "logits (the top-2 logits) differ by more",
}


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Max |diff| allowed per group; routing and greedy tokens allow no disagreement outside near ties. Defaults
    sit a few times above the differences measured on gpt-oss-20b's first two layers (docs/performance.md)."""

    logits: float = 1e-4
    hidden_states: float = 5e-4
    block_taps: float = 2e-3
    decode_logits: float = 1e-4
    near_tie_margin: float = 1e-4

    def atol(self, group: str) -> float:
        return 0.0 if group in EXACT_GROUPS else getattr(self, group)

    @staticmethod
    def flag(key: str) -> str:
        """The command-line flag of a key: ``--atol-<group>``, or ``--near-tie-margin``."""
        return "--" + ("" if key == "near_tie_margin" else "atol-") + key.replace("_", "-")

    def to_args(self) -> list[str]:
        """These tolerances as the flags of ``gptoss parity`` and ``gptoss gate`` (what the workflow passes)."""
        return [part for f in dataclasses.fields(self) for part in (self.flag(f.name), f"{getattr(self, f.name):g}")]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--tolerances FILE`` (YAML/JSON with the keys of this class) and one flag per key; a flag given on
        the command line wins over the file, the file over the defaults."""
        parser.add_argument("--tolerances", type=Path, default=None, help="YAML/JSON file: logits, hidden_states, ...")
        for f in dataclasses.fields(cls):
            parser.add_argument(cls.flag(f.name), type=float, default=None, help=f"{_HELP[f.name]} ({f.default:g})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Tolerances:
        values = dataclasses.asdict(cls())
        if args.tolerances is not None:
            values.update(cls.read(args.tolerances))
        flags = {key: getattr(args, cls.flag(key).removeprefix("--").replace("-", "_")) for key in values}
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    @classmethod
    def read(cls, path: Path) -> dict[str, float]:
        """Tolerances from a YAML or JSON file (JSON is YAML); unknown keys are an error naming the file."""
        import yaml

        from gptoss.errors import GptOssError

        if not path.is_file():
            raise GptOssError(f"{path}: tolerances file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise GptOssError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise GptOssError(f"{path}: expected a mapping with keys among {sorted(known)}")
        try:
            return {k: float(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise GptOssError(f"{path}: tolerances must be numbers") from None


def classify(tensor: str) -> tuple[str, int | None, str]:
    """Output name → (group, block index or None, tap name)."""
    if tensor == "logits":
        return "logits", None, "logits"
    if m := _HIDDEN.match(tensor):
        return "hidden_states", int(m.group(1)), "hidden_state"
    if m := _BLOCK.match(tensor):
        tap = m.group(2)
        return ("routing" if tap == ROUTING_TAP else "block_taps"), int(m.group(1)), tap
    raise ValueError(f"unknown output name {tensor!r}")
