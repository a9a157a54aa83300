"""How far the int8-rounded teacher that travels to a GPU box is from the teacher (session 23).

python docs/reproduce/teacher_q8_check.py TEACHER_DIR ROUNDED_DIR STSB_CSV [N]

Embeds the first N (512) distinct sentences of an STS-B file with both folders (fp32 on this CPU,
the code path of ``--tc-teacher``) and prints the cosine between each text's two embeddings and
the KL between the in-batch similarity distributions that TC distillation matches (batches of 64
texts, temperature 0.05), next to the KL between the teacher's and the student base's (MiniLM).
"""
import sys

import torch

from mtpf_training.checkpoint import resolve_base_model
from mtpf_training.losses import similarity_distill
from mtpf_training.teachers import SentenceTeacher


def in_batch_kl(a, b, batch=64, temperature=0.05):
    """Mean over texts of KL(p_a || p_b): the TC distillation loss with ``a`` as the teacher."""
    return float(torch.stack([similarity_distill(b[i:i + batch], a[i:i + batch], temperature)
                              for i in range(0, len(a) - batch + 1, batch)]).mean())


def main(teacher_dir, rounded_dir, stsb, n=512):
    with open(stsb, encoding="utf-8") as f:
        texts = list(dict.fromkeys(t for line in f for t in line.rstrip("\n").split("\t")[5:7]))[:int(n)]
    emb = {name: SentenceTeacher(path, max_length=64).embed(texts)
           for name, path in (("fp32", teacher_dir), ("int8", rounded_dir), ("minilm", resolve_base_model("minilm")))}
    cos = (emb["fp32"] * emb["int8"]).sum(-1)
    print(f"{len(texts)} texts: cosine(fp32, int8) min {cos.min():.5f} mean {cos.mean():.5f}")
    print(f"in-batch KL(fp32 || int8) {in_batch_kl(emb['fp32'], emb['int8']):.5f}")
    print(f"in-batch KL(fp32 || minilm) {in_batch_kl(emb['fp32'], emb['minilm']):.5f} (what distillation closes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
