"""--checkpoint: full SD1.x / SD2.x / SDXL .safetensors checkpoints (built small here, with text
encoder and VAE keys beside the UNet), architecture read from the keys, --arch checked against it,
pickle and other files refused with the reason, all before a model is built."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lib_unetmods.lab import bench, bench_cli, bench_run
from lib_unetmods.lab.bench_checkpoint import UNET_PREFIX, inspect_checkpoint, load_unet_weights
from lib_unetmods.lab.bench_cli import BenchError
from lib_unetmods.lab.random_unets import build_unet

# keys a real checkpoint has beside the UNet (names as in SD1.x / SD2.x / SDXL files)
OTHERS = {
    "sd15": ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
             "first_stage_model.decoder.conv_in.weight"],
    "sd21": ["cond_stage_model.model.token_embedding.weight", "first_stage_model.encoder.conv_in.weight"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight", "first_stage_model.decoder.conv_in.weight"],
}


def write_checkpoint(path, unet, arch, prefix=UNET_PREFIX, dtype=torch.float16, edit=None):
    state = {prefix + k: v.to(dtype).contiguous() for k, v in unet.state_dict().items()}
    if prefix:
        state.update({k: torch.randn(4, 3) for k in OTHERS[arch]})
    if edit:
        edit(state)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_full_checkpoint_detected_and_loaded(arch, tmp_path):
    source = build_unet(arch, "tiny", seed=3)
    path = write_checkpoint(tmp_path / f"{arch}.safetensors", source, arch)
    info = inspect_checkpoint(str(path))
    assert (info.arch, info.size, info.prefix) == (arch, "tiny", UNET_PREFIX)
    assert info.other_keys == len(OTHERS[arch])
    target = build_unet(arch, "tiny", seed=4)
    assert not torch.equal(target.input_blocks[0][0].weight, source.input_blocks[0][0].weight)
    load_unet_weights(target, info)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # the file's float16 values, read as float32


def test_unet_only_file_is_accepted(tmp_path):
    path = write_checkpoint(tmp_path / "unet.safetensors", build_unet("sd21", "tiny"), "sd21", prefix="")
    info = inspect_checkpoint(str(path))
    assert (info.arch, info.prefix, info.other_keys) == ("sd21", "", 0)


def test_arch_is_checked_against_the_checkpoint(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "xl.safetensors", build_unet("sdxl", "tiny"), "sdxl")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--checkpoint", str(path), "--arch", "sd15", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--arch sd15 does not match the checkpoint" in err and "sdxl" in err and len(err.splitlines()) == 1
    args = bench_cli.parse_args(["--checkpoint", str(path), "--out", str(tmp_path)])
    assert (args.arch, args.unet_size) == ("sdxl", "tiny")


def test_pickle_checkpoints_are_refused_with_the_reason(tmp_path):
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(BenchError, match="pickle.*arbitrary code"):
        inspect_checkpoint(str(ckpt))
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(ckpt.read_bytes())  # torch.save's zip, renamed
    with pytest.raises(BenchError, match="pickle"):
        inspect_checkpoint(str(disguised))


def test_other_files_are_refused_with_the_reason(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(BenchError, match="not a .safetensors file"):
        inspect_checkpoint(str(junk))
    with pytest.raises(BenchError, match="is a folder"):
        inspect_checkpoint(str(tmp_path))
    vae = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(vae))
    with pytest.raises(BenchError, match="no ldm/sgm UNet keys"):
        inspect_checkpoint(str(vae))


def test_inpainting_and_refiner_unets_are_refused(tmp_path):
    def nine_channels(state):
        key = UNET_PREFIX + "input_blocks.0.0.weight"
        state[key] = torch.zeros(state[key].shape[0], 9, 3, 3, dtype=torch.float16)

    path = write_checkpoint(tmp_path / "inpaint.safetensors", build_unet("sd15", "tiny"), "sd15", edit=nine_channels)
    with pytest.raises(BenchError, match="9 input channels"):
        inspect_checkpoint(str(path))

    def refiner(state):
        key = UNET_PREFIX + "label_emb.0.0.weight"
        state[key] = torch.zeros(state[key].shape[0], 2560, dtype=torch.float16)

    path = write_checkpoint(tmp_path / "refiner.safetensors", build_unet("sdxl", "tiny"), "sdxl", edit=refiner)
    with pytest.raises(BenchError, match="2560"):
        inspect_checkpoint(str(path))


def test_benchmark_runs_on_the_checkpoint_weights(tmp_path, capsys, monkeypatch):
    source = build_unet("sd15", "tiny", seed=7)
    path = write_checkpoint(tmp_path / "tiny-sd15.safetensors", source, "sd15", dtype=torch.float32)
    loaded = []
    original = bench_run.load_unet_weights
    monkeypatch.setattr(bench_run, "load_unet_weights", lambda unet, info: (original(unet, info), loaded.append(unet)))
    code = bench.main(["--checkpoint", str(path), "--size", "64x64", "--steps", "1", "--repeats", "1",
                       "--mods", "freeu", "--json", "--out", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["checkpoint"] for r in rows} == {str(path)} and {r["arch"] for r in rows} == {"sd15"}
    assert [r["label"] for r in rows if r["speedup"] is not None] == ["baseline", "freeu"]
    for a, b in zip(source.state_dict().values(), loaded[0].state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / (bench_run.file_tag(bench_cli.parse_args(
        ["--checkpoint", str(path), "--size", "64x64", "--steps", "1", "--repeats", "1", "--mods", "freeu",
         "--out", str(tmp_path)])) + ".png")).exists()
