"""Target 1: training on the frozen-feature cache vs running the backbone online, per epoch.

Same training config, same rows, ``feature_mode: cache`` vs ``feature_mode: online``, through the
real entry point ``model.train``. Two backbones:

- the demo's tiny random ViT (fairfront-tiny-vit) on the demo's synthetic images (full demo size);
- ViT-L-14 shapes: ``ViT-L-14-quickgelu`` with random weights (same FLOPs as the real one) on a few
  of the same images resized to 224 px, [N, 256, 1024] tokens, the ~9.4M-parameter adapter.

The cache for each backbone is built first (timed: that is target 4's rate on this machine too).

    python -m bench.cache_vs_online [--vitl-train 48 --vitl-val 16] [--threads N]

On a GPU (used when there is one; target >= 30x with ViT-L-14), as bench/device/gpu_session.sh runs it:
    python -m bench.cache_vs_online --tiny-epochs 2 --vitl-train 512 --vitl-val 64 --vitl-batch 32 --vitl-epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics

import torch

from bench._common import WORK, demo_prepared, gpu_note, machine, markdown_table, set_threads, subset_manifest, timer, write_result


def measure(config, manifest, backbone_config, *, epochs: int, root, label: str) -> dict:
    from model import PreparedData, train
    from model.backbone import LazyBackbone
    from model.cache import open_or_build_cache
    from model.config import ModelConfig
    from model.detector import Stage1Adapter
    from model.runtime import resolve_device

    device = resolve_device(config.training.device)
    backbone = LazyBackbone(backbone_config)
    shutil.rmtree(root, ignore_errors=True)
    with timer() as build:
        cache = open_or_build_cache(manifest, backbone, root, device=device, num_workers=config.data.num_workers, progress=False)
    torch.manual_seed(0)
    stage1 = Stage1Adapter(backbone.shape.width, ModelConfig()).state_dict()
    config = dataclasses.replace(config, backbone=backbone_config)
    seconds = {}
    for mode in ("cache", "online"):
        run = dataclasses.replace(config.with_training(feature_mode=mode, num_epochs=epochs, warmup_epochs=0, stop_if_degenerate_after=None),
                                  output_dir=root / f"train-{mode}")
        prepared = PreparedData(run, manifest, {}, backbone, cache, root / "stage1.pt", stage1)
        result = train(run, prepared=prepared, progress=False, write_outputs=False)
        seconds[mode] = [r.seconds for r in result.epochs]
    n = len(manifest.frame)
    cache_epoch, online_epoch = statistics.median(seconds["cache"]), statistics.median(seconds["online"])
    return {
        "backbone": label, "images (train+val)": n, "token shape": f"[{backbone.shape.token_shapes()[0]}, {backbone.shape.width}]",
        "cache epoch s": cache_epoch, "online epoch s": online_epoch, "ratio online/cache": online_epoch / cache_epoch,
        "cache build img/s": n / build(), "epochs timed": epochs,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tiny-epochs", type=int, default=2)
    parser.add_argument("--vitl-train", type=int, default=48)
    parser.add_argument("--vitl-val", type=int, default=16)
    parser.add_argument("--vitl-batch", type=int, default=16)
    parser.add_argument("--vitl-epochs", type=int, default=1, help="ViT-L-14 epochs timed per mode (the median is reported)")
    parser.add_argument("--skip-vitl", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine()
    from model import BackboneConfig

    config, prepared = demo_prepared()
    config = config.with_training(device="auto")  # the demo trains on the CPU; this measures the GPU when there is one
    rows = []
    tiny_manifest = subset_manifest(prepared.manifest, 1600, 400)
    rows.append(measure(config, tiny_manifest, config.backbone, epochs=args.tiny_epochs, root=WORK / "cache-vs-online" / "tiny",
                        label="fairfront-tiny-vit (demo)"))
    if not args.skip_vitl:
        vitl = BackboneConfig(name="ViT-L-14-quickgelu", weights="random", stage1_layer=-1, stage2_layer=-1,
                              precision="bf16", cache_dtype="float16", batch_size=16)
        manifest = subset_manifest(prepared.manifest, args.vitl_train, args.vitl_val)
        rows.append(measure(config.with_training(batch_size=args.vitl_batch), manifest, vitl, epochs=args.vitl_epochs,
                            root=WORK / "cache-vs-online" / "vitl", label="ViT-L-14-quickgelu (random weights)"))
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    notes = [
        f"Measured on the {device} through model.train (the real loop: AdapterDetector + fairness loss + AdamW), "
        "the same config in both modes; an epoch = training steps + validation; median over the timed epochs.",
        "Target on GPU with ViT-L-14 shapes: >= 30x. " + gpu_note(),
        f"ViT-L-14 row: real 224-px forward of the full ViT-L-14 on the {device} ({'bf16 autocast' if device == 'CUDA' else 'fp32'}) "
        "on a few demo images, adapter at width 1024 (~9.4M trainable parameters). The online/cache ratio at real shapes is set by "
        "backbone FLOPs (~81 GMAC/image) vs adapter training FLOPs (~6.5 GMAC/image fwd+bwd), so ~10-15x on any "
        "FLOP-bound device; on a GPU the online path is also bound by single-process image decoding.",
        "Cache build img/s here = decode + preprocess + backbone forward + write, DataLoader workers = data.num_workers "
        "(0 in the demo); see bench/cache_build.py for worker counts.",
    ]
    write_result("cache_vs_online", "Target 1: cache vs online backbone, per-epoch training time",
                 markdown_table(rows), info=info, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
