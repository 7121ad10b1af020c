"""Prompt bank: prompts file → teacher text embeddings (ensemble mean per label) → .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retrofit_agent.contract.bundle import save_bank
from retrofit_agent.contract.prompts import PromptSet
from retrofit_agent.train.teacher import Teacher


def encode_prompt_set(
    teacher: Teacher, prompts: PromptSet, batch_size: int = 256
) -> tuple[np.ndarray, list[str], list[str]]:
    rows, groups, labels = [], [], []
    for g in prompts.groups:
        for lab in g.labels:
            texts = prompts.prompts(g, lab)
            emb = torch.cat([teacher.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
            mean = torch.nn.functional.normalize(emb.mean(dim=0), dim=-1)
            rows.append(mean.cpu().numpy().astype(np.float32))  # .cpu(): the teacher may be on a GPU
            groups.append(g.name)
            labels.append(lab.name)
    return np.stack(rows), groups, labels


def write_bank(path: Path, teacher: Teacher, prompts: PromptSet) -> Path:
    emb, groups, labels = encode_prompt_set(teacher, prompts)
    save_bank(path, emb, groups, labels, teacher.identity, teacher.fingerprint(), teacher.logit_scale)
    return path
