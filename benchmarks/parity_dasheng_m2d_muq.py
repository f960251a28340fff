"""Parity of our Dasheng, M2D and MuQ exporters against the official implementations.

Each official model is built with random weights, saved in its official checkpoint format, loaded
by our exporter, and both are run on the same audio: torch vs torch (the architecture and the
checkpoint mapping) and onnxruntime vs the official torch model (the exported graph).

Nothing here is a dependency of the project. The official code is read from outside the
repository and is never committed; set it up once, outside the project's virtualenv:

    pip install --no-deps --target /tmp/refpkgs dasheng==0.0.9 muq==0.1.0 einops easydict \\
        'transformers==4.57.6' 'huggingface_hub<1.0' tokenizers safetensors regex nnAudio==0.3.4 timm
    # M2D: examples/portable_m2d.py from github.com/nttcslab/m2d, saved as /tmp/ref/portable_m2d.py

    .venv/bin/python benchmarks/parity_dasheng_m2d_muq.py --ref /tmp/refpkgs --m2d /tmp/ref/portable_m2d.py

torchaudio does not load beside torch 2.13 and timm imports torchvision at import time, so two
stand-ins are installed first: ``torchaudio.transforms.MelSpectrogram`` / ``AmplitudeToDB`` written
with ``torch.stft`` and librosa's filters (independent of our frontend, with torchaudio's
documented semantics, including its batch-wide ``top_db`` floor and its state-dict buffers), and
an empty ``torchvision`` (timm's ViT uses none of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- stand-ins -------------------------------------------------------------------------------------

def torchaudio_standin() -> types.ModuleType:
    """A ``torchaudio`` module with the two transforms Dasheng and MuQ use."""
    import librosa

    class _Spectrogram(nn.Module):
        def __init__(self, n_fft: int, win_length: int, hop_length: int, center: bool, pad_mode: str, power: float) -> None:
            super().__init__()
            self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
            self.center, self.pad_mode, self.power = center, pad_mode, power
            self.register_buffer("window", torch.hann_window(win_length))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            spec = torch.stft(x.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length, self.window,
                              center=self.center, pad_mode=self.pad_mode, return_complex=True)
            spec = spec.abs().pow(self.power)
            return spec.reshape(shape[:-1] + spec.shape[-2:])

    class _MelScale(nn.Module):
        def __init__(self, n_mels: int, sample_rate: int, f_min: float, f_max: float, n_stft: int) -> None:
            super().__init__()
            fb = librosa.filters.mel(sr=sample_rate, n_fft=(n_stft - 1) * 2, n_mels=n_mels, fmin=f_min, fmax=f_max,
                                     htk=True, norm=None)
            self.register_buffer("fb", torch.from_numpy(fb.T.astype(np.float32)))

        def forward(self, spec: torch.Tensor) -> torch.Tensor:
            return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)

    class MelSpectrogram(nn.Module):
        def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int | None = None,
                     hop_length: int | None = None, f_min: float = 0.0, f_max: float | None = None, pad: int = 0,
                     n_mels: int = 128, window_fn=torch.hann_window, power: float = 2.0, normalized: bool = False,
                     wkwargs=None, center: bool = True, pad_mode: str = "reflect", onesided=None, norm=None,
                     mel_scale: str = "htk") -> None:
            super().__init__()
            assert pad == 0 and not normalized and norm is None and mel_scale == "htk" and window_fn is torch.hann_window
            win_length = win_length or n_fft
            hop_length = hop_length or win_length // 2
            f_max = f_max if f_max is not None else float(sample_rate // 2)
            self.spectrogram = _Spectrogram(n_fft, win_length, hop_length, center, pad_mode, power)
            self.mel_scale = _MelScale(n_mels, sample_rate, f_min, f_max, n_fft // 2 + 1)

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            return self.mel_scale(self.spectrogram(waveform))

    class AmplitudeToDB(nn.Module):
        def __init__(self, stype: str = "power", top_db: float | None = None) -> None:
            super().__init__()
            self.multiplier = 10.0 if stype == "power" else 20.0
            self.amin, self.db_multiplier, self.top_db = 1e-10, 0.0, top_db

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_db = self.multiplier * torch.log10(torch.clamp(x, min=self.amin)) - self.multiplier * self.db_multiplier
            if self.top_db is not None:  # torchaudio packs a [B, F, T] input as one [1, B, F, T] "batch"
                shape = x_db.shape
                channels = shape[-3] if x_db.dim() > 2 else 1
                packed = x_db.reshape(-1, channels, shape[-2], shape[-1])
                packed = torch.max(packed, (packed.amax(dim=(-3, -2, -1)) - self.top_db).view(-1, 1, 1, 1))
                x_db = packed.reshape(shape)
            return x_db

    module = types.ModuleType("torchaudio")
    transforms = types.ModuleType("torchaudio.transforms")
    module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None, is_package=True)
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchaudio.transforms", None)
    transforms.MelSpectrogram, transforms.AmplitudeToDB = MelSpectrogram, AmplitudeToDB
    module.transforms = transforms
    return module


def install_torchaudio_standin() -> None:
    module = torchaudio_standin()
    sys.modules["torchaudio"], sys.modules["torchaudio.transforms"] = module, module.transforms


class _Anything(type):
    def __getattr__(cls, name: str) -> type:
        return _Anything(name, (), {})


def _dummy_attribute(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything(name, (), {})


class _EmptyPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any ``torchvision[.x]`` import gives a module whose every attribute is a dummy class."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _dummy_attribute
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic random (defaults are ones / zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) or 1.0))


def audio(rate: int, seconds: float, batch: int = 2, seed: int = 0) -> torch.Tensor:
    from tests.synth import machine_sound

    return torch.from_numpy(np.stack([machine_sound(seed + i, seconds, rate=rate) for i in range(batch)]))


def onnx_vs(reference: np.ndarray, module: nn.Module, meta, x: torch.Tensor, tmp: Path) -> float:
    import onnxruntime as ort

    from export.onnx_export import export_backbone

    path = export_backbone(module, meta, tmp)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return rel(reference, session.run(None, {"waveform": x.numpy()})[0])


# --- Dasheng ---------------------------------------------------------------------------------------

def dasheng_parity(tmp: Path, results: dict) -> None:
    from dasheng.pretrained.pretrained import Dasheng

    from export import dasheng as ours
    from export.registry import EXPORTERS

    x = audio(16000, 10.0)
    for name, depth in (("dasheng-base", None), ("dasheng-0.6b", 2), ("dasheng-1.2b", 2)):
        size = ours.SIZES[name]
        size = dataclasses.replace(size, depth=depth or size.depth)
        torch.manual_seed(0)
        official = Dasheng(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, target_length=1008).eval()
        randomise(official, 1)
        path = tmp / size.file
        torch.save({"model": official.state_dict(), "config": {"target_length": 1008, "group_masking": True}}, path)
        mine = ours.load_dasheng(path, name, size)
        with torch.no_grad():
            ref1 = np.concatenate([official(x[i:i + 1]).mean(1).numpy() for i in range(len(x))])
            ref_batch = official(x).mean(1).numpy()
            got = mine(x).numpy()
            short_ref = official(x[:1, :80000]).mean(1).numpy()
            short = mine(x[:1, :80000]).numpy()
        entry = {"depth": size.depth, "width": size.embed_dim, "heads": size.num_heads,
                 "torch_rel_error": rel(ref1, got), "torch_rel_error_5s": rel(short_ref, short),
                 "official_batch_vs_single": rel(ref1, ref_batch)}
        if depth is None:
            meta = EXPORTERS[name].build(argparse.Namespace(checkpoint=path, random_init=False))[1]
            entry["onnx_rel_error"] = onnx_vs(ref1, mine, meta, x, tmp / "onnx")
        results[name] = entry
        print(name, entry, flush=True)


# --- M2D -------------------------------------------------------------------------------------------

def m2d_parity(tmp: Path, results: dict, portable: Path) -> None:
    sys.meta_path.insert(0, _EmptyPackage())
    sys.path.insert(0, str(portable.parent))
    import portable_m2d

    from export import m2d as ours
    from export.registry import EXPORTERS

    for release, rate in (("m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly", 16000),
                          ("m2d_vit_base-80x608p16x16-221006-mr7", 16000),
                          ("m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly", 32000)):
        input_size, patch_size, *_ = portable_m2d.parse_sizes_by_name(release)
        torch.manual_seed(0)
        vit = portable_m2d.LocalViT(in_chans=1, img_size=input_size, patch_size=patch_size, embed_dim=768, depth=12,
                                    num_heads=12, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        randomise(vit, 2)
        with torch.no_grad():
            vit.norm_stats.copy_(torch.tensor([-6.8, 4.5]))
        state = dict(vit.state_dict())
        state["decoder_pred.weight"] = torch.zeros(3, 3)  # a training-only tensor, left out by both loaders
        folder = tmp / release
        folder.mkdir()
        weight_file = folder / "weights_ep1.pth"
        torch.save({"model": state, "args": {"note": "stand-in"}}, weight_file)
        official = portable_m2d.PortableM2D(str(weight_file)).eval()
        mine = ours.load_m2d(weight_file)
        x = audio(rate, 10.0)
        with torch.no_grad():
            ref = official.get_scene_embeddings(x).numpy()
            got = mine(x).numpy()
            short_ref = official.get_scene_embeddings(x[:1, : rate * 5]).numpy()
            short = mine(x[:1, : rate * 5]).numpy()
        entry = {"torch_rel_error": rel(ref, got), "torch_rel_error_5s": rel(short_ref, short),
                 "dim": int(got.shape[1]), "variable_length": mine.single_chunk}
        if rate == 16000:
            meta = EXPORTERS["m2d"].build(argparse.Namespace(checkpoint=weight_file, random_init=False, sizes=None))[1]
            entry["onnx_rel_error"] = onnx_vs(ref, mine, meta, x, tmp / f"onnx-{release}")
        results["m2d " + release] = entry
        print(release, entry, flush=True)


# --- MuQ -------------------------------------------------------------------------------------------

# The wav2vec2-conformer settings of the MuQ pre-training recipe (the published config's w2v2_config).
W2V2 = {"activation_dropout": 0.1, "attention_dropout": 0.1, "conformer_conv_dropout": 0.1,
        "conv_depthwise_kernel_size": 31, "feat_extract_activation": "gelu", "hidden_act": "swish",
        "hidden_dropout": 0.1, "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-5,
        "layerdrop": 0.0, "num_attention_heads": 16, "num_conv_pos_embedding_groups": 16,
        "num_conv_pos_embeddings": 128, "num_hidden_layers": 24, "position_embeddings_type": "rotary",
        "rotary_embedding_base": 10000, "max_source_positions": 5000, "model_type": "wav2vec2-conformer"}


def muq_parity(tmp: Path, results: dict) -> None:
    import importlib.util

    # Import muq.muq without the package's top-level __init__ (it also imports MuQ-MuLan's text side).
    spec = importlib.util.find_spec("muq")
    package = types.ModuleType("muq")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["muq"] = package
    from muq.muq.muq import MuQ, MuQConfig
    from safetensors.torch import save_file

    from export import muq as ours
    from export.registry import EXPORTERS

    config = MuQConfig(stat={"melspec_2048_cnt": 1, "melspec_2048_mean": 5.5, "melspec_2048_std": 17.0},
                       w2v2_config=dict(W2V2))
    torch.manual_seed(0)
    official = MuQ(config).eval()
    randomise(official, 3)
    folder = tmp / "MuQ-large-msd-iter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(folder / "model.safetensors"))
    mine = ours.load_muq(folder)
    x = audio(24000, 10.0)
    with torch.no_grad():
        ref = official(x, output_hidden_states=False).last_hidden_state.mean(1).numpy()
        got = mine(x).numpy()
        short_ref = official(x[:1, :120000], output_hidden_states=False).last_hidden_state.mean(1).numpy()
        short = mine(x[:1, :120000]).numpy()
    entry = {"torch_rel_error": rel(ref, got), "torch_rel_error_5s": rel(short_ref, short), "dim": int(got.shape[1]),
             "parameters_M": round(sum(p.numel() for p in mine.parameters()) / 1e6, 1)}
    meta = EXPORTERS["muq"].build(argparse.Namespace(checkpoint=folder, random_init=False))[1]
    entry["onnx_rel_error"] = onnx_vs(ref, mine, meta, x, tmp / "onnx-muq")
    results["muq"] = entry
    print("muq", entry, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", type=Path, default=Path("/tmp/refpkgs"), help="folder with the official packages")
    parser.add_argument("--m2d", type=Path, default=Path("/tmp/ref/portable_m2d.py"), help="official portable_m2d.py")
    parser.add_argument("--only", choices=["dasheng", "m2d", "muq"], action="append")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "parity_dasheng_m2d_muq.json")
    args = parser.parse_args()
    sys.path.append(str(args.ref))  # after the venv: the venv's torch and numpy win
    install_torchaudio_standin()
    torch.set_num_threads(2)
    results: dict = {"torch": torch.__version__}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or ["dasheng", "m2d", "muq"]:
            sub = Path(tmp) / name
            sub.mkdir()
            if name == "dasheng":
                dasheng_parity(sub, results)
            elif name == "m2d":
                m2d_parity(sub, results, args.m2d)
            else:
                muq_parity(sub, results)
    results["seconds"] = round(time.time() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    args.json.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    worst = max(v["torch_rel_error"] for v in results.values() if isinstance(v, dict))
    print(f"worst torch-vs-official relative error {worst:.2e}; written to {args.json}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
