"""Move checkpoints between this VM and the GPU box within the 64 MiB transfer limits.

widen SRC DST        fp16 model folder -> fp32 copy (the GPU box's base)
narrow SRC DST       fp32 model folder -> fp16 copy (what travels)
pack BASE CKPT DEST  backbone as a bf16 delta against BASE + everything else, tar.xz split in 15 MB parts
unpack BASE DEST PARTS...  rebuild the checkpoint: BASE + delta, backbone_sha256 updated
q8 SRC DST           model folder -> per-row int8 copy (a teacher too large to travel in fp16, session 23)
dq8 SRC DST          per-row int8 copy -> fp32 model folder (the GPU box's teacher)
"""
import hashlib, io, json, shutil, sys, tarfile
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

PART = 15_000_000


def cast_folder(src, dst, dtype):
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    w = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    print("wrote", dst, hashlib.sha256((dst / "model.safetensors").read_bytes()).hexdigest())


def pack(base, ckpt, dest):
    base, ckpt, dest = Path(base), Path(ckpt), Path(dest)
    b = load_file(str(base / "model.safetensors"))
    f = load_file(str(ckpt / "backbone/model.safetensors"))
    delta = {k: (v.float() - b[k].float()).to(torch.bfloat16) for k, v in f.items()}
    rel = max(float((delta[k].float() + b[k].float() - f[k].float()).abs().max()) for k in f)
    print(f"{ckpt.name}: {len(f)} tensors, max abs reconstruction error {rel:.3g}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tmp = Path("/tmp") / f"delta_{ckpt.name}.safetensors"
        save_file(delta, str(tmp), metadata={"format": "pt"})
        tar.add(tmp, "delta.safetensors")
        for p in sorted(ckpt.rglob("*")):
            if p.is_file() and p.relative_to(ckpt).as_posix() != "backbone/model.safetensors":
                tar.add(p, p.relative_to(ckpt).as_posix())
        log = Path("/tmp") / f"{ckpt.name}.log"
        if log.is_file():
            tar.add(log, "run.log")
    data = buf.getvalue()
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(data), PART):
        (dest / f"part{i // PART:02d}").write_bytes(data[i:i + PART])
    print(f"{ckpt.name}: {len(data) / 1e6:.1f} MB in {dest}")


def unpack(base, dest, parts):
    base, dest = Path(base), Path(dest)
    data = b"".join(Path(p).read_bytes() for p in sorted(parts))
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(dest, filter="data")
    b = load_file(str(base / "model.safetensors"))
    d = load_file(str(dest / "delta.safetensors"))
    save_file({k: b[k].float() + v.float() for k, v in d.items()}, str(dest / "backbone/model.safetensors"),
              metadata={"format": "pt"})
    (dest / "delta.safetensors").unlink()
    cfg = json.loads((dest / "config.json").read_text())
    cfg["backbone_sha256"] = hashlib.sha256((dest / "backbone/model.safetensors").read_bytes()).hexdigest()
    cfg["pretrain"]["transfer"] = ("trained on a GPU box from an fp16-rounded copy of the base; backbone "
                                   "rebuilt here as that copy (fp32) + the run's bf16 weight delta")
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    print("rebuilt", dest, cfg["backbone_sha256"])


SCALE = ".__row_scale__"


def quantize_folder(src, dst):
    """2-D float weights as int8 with one fp32 scale per row (absmax / 127); the rest kept in fp32."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "desktop.ini"))
    out = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if v.is_floating_point() and v.dim() == 2:
            scale = (v.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            out[k] = torch.round(v.float() / scale).to(torch.int8)
            out[k + SCALE] = scale
        else:
            out[k] = v.float() if v.is_floating_point() else v
    save_file(out, str(dst / "model_q8.safetensors"), metadata={"format": "pt"})
    print("wrote", dst, sum(t.numel() * t.element_size() for t in out.values()) / 1e6, "MB")


def dequantize_folder(src, dst):
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model_q8.safetensors"))
    q = load_file(str(src / "model_q8.safetensors"))
    w = {k: (v.float() * q[k + SCALE] if k + SCALE in q else v) for k, v in q.items() if not k.endswith(SCALE)}
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    print("wrote", dst, hashlib.sha256((dst / "model.safetensors").read_bytes()).hexdigest())


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "widen":
        cast_folder(a[0], a[1], torch.float32)
    elif cmd == "narrow":
        cast_folder(a[0], a[1], torch.float16)
    elif cmd == "pack":
        pack(*a)
    elif cmd == "unpack":
        unpack(a[0], a[1], a[2:])
    elif cmd == "q8":
        quantize_folder(*a)
    elif cmd == "dq8":
        dequantize_folder(*a)
    else:
        sys.exit(f"unknown command {cmd!r}: see the docstring")
