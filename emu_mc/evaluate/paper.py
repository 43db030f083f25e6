"""The paper's zero-shot Emu-14B numbers, to print beside a run (arXiv:2307.05222, ICLR 2024).

CHECK BEFORE QUOTING: these figures were entered from memory of Table 1 (row "Emu", zero-shot) and
Table 3 (zero-shot FID on MS-COCO 30k) and have not yet been checked against the PDF; `checked` says so
and the Markdown table marks them. Set checked=True only after comparing with the paper.
"""
PAPER = {
    # task: (metric, value, source)
    "coco_caption": ("CIDEr", 112.4, "Table 1, row Emu, COCO (Karpathy test)"),
    "nocaps": ("CIDEr", 96.5, "Table 1, row Emu, NoCaps"),
    "flickr30k": ("CIDEr", 72.0, "Table 1, row Emu, Flickr30K"),
    "vqav2": ("accuracy", 52.0, "Table 1, row Emu, VQAv2"),
    "okvqa": ("accuracy", 38.2, "Table 1, row Emu, OKVQA"),
    "vizwiz": ("accuracy", 34.2, "Table 1, row Emu, VizWiz"),
    "msvd_qa": ("accuracy", 18.8, "Table 1, row Emu, MSVD-QA"),
    "msrvtt_qa": ("accuracy", 8.3, "Table 1, row Emu, MSRVTT-QA"),
    "t2i_coco": ("FID", 11.66, "Table 3, row Emu, MS-COCO 30k zero-shot FID"),
}
checked = False
