"""A CLIP teacher trained from scratch on the procedural world (no pretrained weights exist here).

    retrofit-model teacher-train --config models/configs/world-teacher.toml --out DIR [--resume]
    retrofit-model teacher-train --config ... --out DIR --eval-only

- :mod:`.config`: the validated recipe (torch-free).
- :mod:`.stream`: world scenes rendered on the fly into the teacher's own input view.
- :mod:`.trainer`: open_clip model, tokenizer and ClipLoss in a compact resumable CPU loop.
- :mod:`.zeroshot_eval`: held-out zero-shot top-1 and AUROC per group with the prompts bank.
- :mod:`.cli`: the ``teacher-train`` command.

The checkpoint is open_clip's format, so distillation names the teacher as
``teacher.model = "retrofit-world-clip-rn"``, ``teacher.pretrained = "DIR/checkpoint.pt"``.

Two model configs: ``retrofit-world-clip-rn`` (open_clip's ResNet tower, the recipe's
default: it learns the world 5-10x faster per picture on a CPU) and ``retrofit-world-clip``
(a ViT 6 x 256, patch 16, whose attention blocks also feed distillation's PCA and GL losses,
which a ResNet teacher cannot).
"""
