"""Zero- and few-shot evaluation of a trained Emu, reported like the paper's tables.

    python -m emu_mc.evaluate --task coco_caption --checkpoint runs/tiny --data karpathy.json --split test \\
        --media-dir coco/ --out runs/tiny/eval/coco
    torchrun --nproc_per_node=8 -m emu_mc.evaluate --task vqav2 --checkpoint runs/emu14b \\
        --data v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json \\
        --media-dir coco/val2014 --style instruct --shots 4 --out runs/emu14b/eval/vqav2

Modules: datasets (annotation readers), prompts (base / instruct prompts, shots, answer shortening),
tasks (the registry), predictions (resumable JSONL), caption_metrics (PTB tokenisation, BLEU, CIDEr-D),
vqa_accuracy (the official VQA accuracy), fid (FID from a local Inception), paper (the paper's numbers),
cli (the command). See docs/evaluation.md.
"""
