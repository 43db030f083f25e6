"""Where the paper's zero-shot Emu-14B numbers live (arXiv:2307.05222, ICLR 2024), to print beside a run.

No figure is entered here: none could be checked against the paper's tables when this was written (the
project's machines have no internet), and a number without its checked source is worse than none.
`PAPER` names, for each task, the metric and the table row to copy from; `load_paper_numbers` reads the
figures from a JSON file a user fills in from the PDF, each with its table and row:

    {"coco_caption": {"value": 0.0, "source": "Table 1, row Emu, COCO"}, ...}

`python -m emu_mc.evaluate --paper-numbers FILE` prints them in the report; without it the paper column
says "not entered".
"""
import json
from typing import Dict

PAPER = {
    # task: (metric, where in the paper to copy the Emu-14B zero-shot figure from)
    "coco_caption": ("CIDEr", "Table 1 (zero-shot), row Emu, COCO Karpathy test"),
    "nocaps": ("CIDEr", "Table 1 (zero-shot), row Emu, NoCaps"),
    "flickr30k": ("CIDEr", "Table 1 (zero-shot), row Emu, Flickr30K"),
    "vqav2": ("accuracy", "Table 1 (zero-shot), row Emu, VQAv2"),
    "okvqa": ("accuracy", "Table 1 (zero-shot), row Emu, OKVQA"),
    "vizwiz": ("accuracy", "Table 1 (zero-shot), row Emu, VizWiz"),
    "msvd_qa": ("accuracy", "Table 1 (zero-shot), row Emu, MSVD-QA"),
    "msrvtt_qa": ("accuracy", "Table 1 (zero-shot), row Emu, MSRVTT-QA"),
    "t2i_coco": ("FID", "the zero-shot text-to-image table, row Emu, MS-COCO 30k FID"),
}


class PaperNumbersError(ValueError):
    """A --paper-numbers file that cannot be used (the message names the file and the entry)."""


def load_paper_numbers(path: str) -> Dict[str, Dict[str, object]]:
    """{task: {"value": float, "source": str}} from a JSON file of {task: {"value": number, "source": "Table N, row R"}}."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PaperNumbersError(f"--paper-numbers {path}: {e}") from None
    if not isinstance(entries, dict):
        raise PaperNumbersError(f"--paper-numbers {path}: expected an object of task -> {{value, source}}")
    numbers = {}
    for task, entry in entries.items():
        if task not in PAPER:
            raise PaperNumbersError(f"--paper-numbers {path}: unknown task {task!r}; one of {', '.join(PAPER)}")
        value = entry.get("value") if isinstance(entry, dict) else None
        source = entry.get("source") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or not isinstance(source, str) or not source.strip():
            raise PaperNumbersError(f"--paper-numbers {path}: {task} needs a numeric \"value\" and a \"source\" "
                                    "naming the paper's table and row")
        numbers[task] = {"value": float(value), "source": source}
    return numbers
