"""boxseg-export: a checkpoint to ONNX / TensorRT / AOTInductor artifacts, parity checked."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from boxseg.cli import HELP, Exit, exit_on_errors, stop_on_sigterm, threads_option, version
from boxseg.data.files import output_folder
from boxseg.threads import configure_threads


@click.command(context_settings=HELP)
@version("boxseg-export")
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="A SegNet1 or SegNet2 checkpoint (stages/<stage>/final.pt).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the artifacts and their metadata files.")
@click.option("--onnx", "do_onnx", is_flag=True, help="ONNX (the default when no format is named).")
@click.option("--fp16", is_flag=True, help="Half precision (ONNX graph in fp16; TensorRT FP16; AOTI fp16).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="ONNX: a dynamic batch axis (TensorRT needs it for its profile).")
@click.option("--dynamic-size", is_flag=True,
              help="ONNX: dynamic height/width too (for a SegNet1 that feeds boxseg-propose's score-map channel).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18).")
@click.option("--trt", "do_trt", is_flag=True, help="A TensorRT engine built from the ONNX file (needs tensorrt and a GPU).")
@click.option("--aoti", "do_aoti", is_flag=True, help="An AOTInductor package (.pt2) for --device.")
@click.option("--batch", type=int, default=64, show_default=True,
              help="TensorRT profile: min 1 / opt BATCH / max 2 x BATCH; AOTI: the package's static batch "
                   "(shorter batches are padded by the Predictor).")
@click.option("--device", default="auto", show_default=True, help="Device for AOTI compilation (auto, cpu, cuda).")
@threads_option
def main(model_path, out_dir, do_onnx, fp16, dynamic_batch, dynamic_size, opset, do_trt, do_aoti, batch, device,
         threads) -> None:
    """Write the artifacts, each with <artifact>.json beside it (metadata with the parity
    result), into --out."""
    from boxseg.cli.train import resolve_device
    from boxseg.models.meta import load_checkpoint_model

    configure_threads(threads)
    if not (do_onnx or do_trt or do_aoti):
        do_onnx = True
    stop_on_sigterm()
    with exit_on_errors():
        model, meta = load_checkpoint_model(model_path)
        output_folder(out_dir)
    stem = (meta["kind"] + ("_5ch" if meta["in_channels"] == 5 else "") + ("_dynsize" if dynamic_size else "")
            + (".fp16" if fp16 else ""))
    failed = False

    def report(path: Path, art: dict) -> None:
        nonlocal failed
        p = art.get("parity")
        line = f"{path}: {art['artifact']} {art['precision']}"
        if p:
            ok = "PASS" if p["passed"] else "FAIL"
            line += (f"; parity vs PyTorch ({p['checked_on']}): {ok}, max|diff| {p['max_abs_diff']:.3g} "
                     f"(x{p['rel_diff']:.2g} of max|ref|), labels identical {100 * p['label_agreement']:.2f}%"
                     + (f", mask IoU {p['mask_iou']:.4f}" if "mask_iou" in p else "")
                     + (f", NON-FINITE outputs {p['non_finite']} (overflow?)" if p.get("non_finite") else ""))
            failed = failed or not p["passed"]
        click.echo(line)

    onnx_path = out_dir / f"{stem}.onnx"
    with exit_on_errors():  # onnxruntime (the parity check) or tensorrt missing, an AOTI build that crashed
        if do_onnx or do_trt:
            from boxseg.export.onnx import export_onnx

            report(onnx_path, export_onnx(model, meta, onnx_path, fp16, dynamic_batch, opset,
                                          dynamic_size=dynamic_size))
        if do_trt:
            from boxseg.export.trt import build_engine

            report(out_dir / f"{stem}.engine", build_engine(onnx_path, meta, out_dir / f"{stem}.engine", fp16, batch))
        if do_aoti:
            from boxseg.export.aoti import export_aoti

            dev = resolve_device(device)
            # compiled in a child process: a crash in torch's compiler is reported, with its phase
            report(out_dir / f"{stem}.pt2", export_aoti(model, meta, out_dir / f"{stem}.pt2", dev, fp16, batch,
                                                        log=click.echo))
    if failed:
        click.echo("error: a parity check failed (see above); the artifact is written but should not be trusted",
                   err=True)
        sys.exit(Exit.PARITY_FAILED)


if __name__ == "__main__":
    main()
