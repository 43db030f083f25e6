"""The one error every converter and loader raises for a bad checkpoint."""
from typing import Sequence


class ConversionError(ValueError):
    """A checkpoint does not fit: a tensor is missing, unexpected or mis-shaped, a file is unreadable,
    or a config is unsupported. The message names the tensor (or file/field) involved."""


def check_shape(name: str, expected: Sequence[int], found: Sequence[int], where: str = "") -> None:
    """Raise ConversionError unless `found` equals `expected` (tensor shapes)."""
    if tuple(expected) != tuple(found):
        raise ConversionError(f"{name}{where}: expected shape {tuple(expected)}, found {tuple(found)}")


def check_keys(expected: Sequence[str], found: Sequence[str], what: str) -> None:
    """Raise ConversionError naming the first missing and unexpected tensor names of `what`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected tensor {unexpected[0]!r}"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise ConversionError(f"{what}: {'; '.join(parts)}")
