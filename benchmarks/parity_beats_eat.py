"""Parity of our BEATs and EAT exporters (and the Kaldi fbank) against the official code.

Each official model is built with random weights from its own code, saved in its official
checkpoint format (BEATs ``{'cfg', 'model'}``; EAT as the fairseq pre-training file with the EMA
teacher, decoder and a training-framework object, the fairseq fine-tuning layout and the
Hugging Face safetensors layout), loaded by our exporter, and both run on the same audio:
torch vs torch (architecture, checkpoint mapping, frontend) and, with ``--onnx``, the exported
graph vs the official torch model.

Nothing here is a dependency of the project, and the official code is never committed. Set it
up once, outside the repository:

    # torchaudio's Kaldi fbank is pure Python: take it from the wheel (torchaudio itself does
    # not load beside torch 2.13)
    pip download --no-deps torchaudio==2.9.1 -d /tmp/ta && unzip -q /tmp/ta/torchaudio-*.whl 'torchaudio/compliance/*' -d /tmp/ta
    # microsoft/unilm beats/{BEATs,backbone,modules}.py -> /tmp/beats_ref/
    # cwx-worst-one/EAT models/{EAT_pretraining,base,modules,images,mae}.py -> /tmp/eat_ref/

    .venv/bin/python benchmarks/parity_beats_eat.py --kaldi /tmp/ta --beats /tmp/beats_ref --eat /tmp/eat_ref [--onnx] [--large]

The official EAT code imports fairseq, timm and omegaconf, none of which install beside torch
2.13 (fairseq needs an old torch; timm imports torchvision): minimal stand-ins are written to a
temporary folder for what the model's inference path uses (timm's ``Mlp`` = fc1, GELU, fc2;
``DropPath`` = identity at eval; fairseq's ``LayerNorm``/``SamePad2d``/``TransposeLast`` for the
pre-training decoder; BERT initialisation), and, for Python >= 3.11, the EAT config dataclasses'
instance defaults become ``default_factory`` (same values).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import beats, eat  # noqa: E402
from export.contract import metadata  # noqa: E402
from export.kaldi import FbankOptions, KaldiFbank  # noqa: E402
from export.onnx_export import export_backbone, relative_error  # noqa: E402
from tests.synth import machine_sound  # noqa: E402

STUBS = {
    "torchaudio/__init__.py": "",
    "omegaconf/__init__.py": """
        from contextlib import contextmanager
        MISSING = "???"
        def II(x): return "${" + x + "}"
        @contextmanager
        def open_dict(c): yield c
    """,
    "fairseq/__init__.py": "",
    "fairseq/modules/__init__.py": """
        import torch
        from torch import nn
        class EMAModuleConfig:
            def __init__(self, **kw): self.__dict__.update(kw)
        class EMAModule:
            def __init__(self, *a, **k): raise RuntimeError("not used: the reference is built with skip_ema")
        def LayerNorm(dim, eps=1e-5, elementwise_affine=True): return nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
        class SamePad(nn.Module):
            def __init__(self, k, causal=False):
                super().__init__(); self.remove = (k - 1) if causal else (1 if k % 2 == 0 else 0)
            def forward(self, x): return x[:, :, : -self.remove] if self.remove > 0 else x
        class SamePad2d(nn.Module):
            def __init__(self, k):
                super().__init__(); self.remove = 1 if k % 2 == 0 else 0
            def forward(self, x): return x[:, :, : -self.remove, : -self.remove] if self.remove > 0 else x
        class TransposeLast(nn.Module):
            def __init__(self, deconstruct_idx=None, tranpose_dim=-2):
                super().__init__(); self.d = deconstruct_idx; self.t = tranpose_dim
            def forward(self, x):
                return (x if self.d is None else x[self.d]).transpose(self.t, -1)
        class GradMultiply(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, scale): ctx.scale = scale; return x.new(x)
            @staticmethod
            def backward(ctx, grad): return grad * ctx.scale, None
    """,
    "fairseq/modules/transformer_sentence_encoder.py": """
        from torch import nn
        def init_bert_params(module):
            if isinstance(module, nn.Linear):
                module.weight.data.normal_(0.0, 0.02)
                if module.bias is not None: module.bias.data.zero_()
            if isinstance(module, nn.Embedding):
                module.weight.data.normal_(0.0, 0.02)
    """,
    "fairseq/dataclass.py": "class FairseqDataclass: pass\n",
    "fairseq/models/__init__.py": """
        from torch import nn
        class BaseFairseqModel(nn.Module):
            def set_num_updates(self, n): pass
        def register_model(name, dataclass=None): return lambda cls: cls
    """,
    "fairseq/models/wav2vec/__init__.py": "",
    "fairseq/models/wav2vec/wav2vec2.py": "class TransformerSentenceEncoderLayer: pass\n",
    "fairseq/data/__init__.py": "",
    "fairseq/data/data_utils.py": "def compute_mask_indices(*a, **k): raise RuntimeError('masking is not used at inference')\n",
    "fairseq/utils.py": "def index_put(t, idx, v):\n    t[idx] = v\n    return t\n",
    "fairseq/tasks.py": "class FairseqTask: pass\n",
    "fairseq/logging/__init__.py": "",
    "fairseq/logging/meters.py": "class AverageMeter:\n    def __init__(self): self.val, self.count = 1.5, 3\n",
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/layers.py": """
        import collections.abc
        def to_2tuple(x): return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)
    """,
    "timm/models/vision_transformer.py": """
        from torch import nn
        class DropPath(nn.Module):
            def __init__(self, p=0.0): super().__init__(); self.p = p
            def forward(self, x): return x
        class Mlp(nn.Module):
            def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
                super().__init__()
                hidden_features = hidden_features or in_features; out_features = out_features or in_features
                self.fc1 = nn.Linear(in_features, hidden_features); self.act = act_layer(); self.drop1 = nn.Dropout(drop)
                self.norm = nn.Identity(); self.fc2 = nn.Linear(hidden_features, out_features); self.drop2 = nn.Dropout(drop)
            def forward(self, x): return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        class PatchEmbed: pass
        class Block: pass
    """,
}


def prepare(work: Path, kaldi: Path, beats_dir: Path | None, eat_dir: Path | None) -> None:
    for name, text in STUBS.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip())
    shutil.copytree(kaldi / "torchaudio" / "compliance", work / "torchaudio" / "compliance")
    if beats_dir:
        for name in ("BEATs.py", "backbone.py", "modules.py"):
            shutil.copy(beats_dir / name, work / name)
    if eat_dir:
        package = work / "eatmodels"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ("EAT_pretraining", "base", "modules", "images", "mae"):
            text = (eat_dir / f"{name}.py").read_text()
            text = re.sub(r"= (D2v\w*Config)\(\)", r"= field(default_factory=\1)", text)
            text = text.replace("from dataclasses import dataclass\n", "from dataclasses import dataclass, field\n")
            (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(work))


def perturb(module: torch.nn.Module, skip: str = "positions") -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip not in name:
                p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def waves() -> torch.Tensor:
    return torch.from_numpy(np.stack([machine_sound(s, 10.0) for s in (1, 2)]))


def err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return relative_error(np.asarray(a), np.asarray(b))


def check_kaldi(report: dict) -> None:
    import torchaudio.compliance.kaldi as ta

    x = waves()[0]
    for window, scale in (("povey", 2.0**15), ("hanning", 1.0)):
        ours = KaldiFbank(FbankOptions(num_mel_bins=128, window_type=window))(x[None] * scale)[0]
        ref = ta.fbank((x * scale)[None], num_mel_bins=128, window_type=window, dither=0.0,
                       sample_frequency=16000, frame_length=25, frame_shift=10)
        report[f"kaldi fbank 128 bins {window} vs torchaudio 2.9.1: max abs"] = float((ours - ref).abs().max())


def onnx_vs(module: torch.nn.Module, name: str, dim: int, expected: np.ndarray, x: torch.Tensor) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = export_backbone(module, metadata(name, 16000, dim, "parity", "-"), Path(tmp))
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"waveform": x.numpy()})[0]
    return err(expected, got)


def check_beats(report: dict, onnx: bool) -> None:
    import BEATs as official

    x = waves()
    for label, cfg in (("base", beats.BASE_CONFIG),
                       ("pre-norm fine-tuned variant", {**beats.SMALL_CONFIG, "deep_norm": False, "layer_norm_first": True,
                                                        "gru_rel_pos": False, "finetuned_model": True, "predictor_class": 7})):
        torch.manual_seed(0)
        ref = perturb(official.BEATs(official.BEATsConfig(dict(cfg))))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "BEATs.pt"
            torch.save({"cfg": dict(cfg), "model": ref.state_dict()}, path)
            parsed, state = beats.load_beats(path)
        layers = int(parsed["encoder_layers"])
        ours = beats.BeatsBackbone(beats.build_model(parsed, state, "parity"), layers).eval()
        with torch.no_grad():
            fbank = ref.preprocess(x).unsqueeze(1)
            feats = ref.patch_embedding(fbank)
            feats = ref.layer_norm(feats.reshape(feats.shape[0], feats.shape[1], -1).transpose(1, 2))
            if ref.post_extract_proj is not None:
                feats = ref.post_extract_proj(feats)
            expected, _ = ref.encoder(feats)
            first, _ = ref.encoder(feats, layer=0)
            got = ours.tokens(x)
            ours.layer = 1
            got_first = ours.tokens(x)
            ours.layer = layers
        report[f"BEATs {label}: tokens vs official"] = err(expected, got)
        report[f"BEATs {label}: embedding (mean) vs official"] = err(expected.mean(1), got.mean(1))
        report[f"BEATs {label}: layer 1 vs official tgt_layer=0"] = err(first, got_first)
        if onnx and label == "base":
            report["BEATs base: ONNX embedding vs official torch"] = onnx_vs(ours, "beats", 768, expected.mean(1).numpy(), x)


def _save_safetensors(state: dict, path: Path) -> None:
    header, blobs, offset = {}, [], 0
    for key, tensor in state.items():
        data = tensor.contiguous().float().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def check_eat(report: dict, onnx: bool, large: bool) -> None:
    import torchaudio.compliance.kaldi as ta
    from eatmodels.EAT_pretraining import (
        D2vModalitiesConfig,
        Data2VecMultiConfig,
        Data2VecMultiModel,
        Modality,
    )
    from eatmodels.images import D2vImageConfig
    from eatmodels.modules import D2vDecoderConfig
    from fairseq.logging.meters import AverageMeter

    def reference_mel(w: torch.Tensor) -> torch.Tensor:  # the official feature_extract.py steps
        w = w - w.mean()
        mel = ta.fbank(w.unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
                       window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10).unsqueeze(0)
        mel = torch.nn.ZeroPad2d((0, 0, 0, 1024 - mel.shape[1]))(mel)
        return ((mel - (-4.268)) / (4.569 * 2)).unsqueeze(0)

    x = waves()
    sizes = [("base", 768, 12, 12)] + ([("large", 1024, 24, 16)] if large else [])
    hf_names = {"modality_encoders.IMAGE.local_encoder.": "model.local_encoder.",
                "modality_encoders.IMAGE.extra_tokens": "model.extra_tokens",
                "modality_encoders.IMAGE.fixed_positional_encoder.positions": "model.fixed_positional_encoder.positions",
                "modality_encoders.IMAGE.context_encoder.norm.": "model.pre_norm.", "blocks.": "model.blocks."}
    for label, dim, depth, heads in sizes:
        torch.manual_seed(0)
        image = D2vImageConfig(in_chans=1, prenet_depth=0, num_extra_tokens=1, init_extra_token_zero=False,
                               use_alibi_encoder=False, num_alibi_heads=heads, model_depth=depth, embed_dim=dim,
                               decoder=D2vDecoderConfig(decoder_dim=768, decoder_groups=16, decoder_kernel=3,
                                                        decoder_layers=6, input_dropout=0))
        cfg = Data2VecMultiConfig(depth=depth, num_heads=heads, embed_dim=dim, norm_eps=1e-6, encoder_dropout=0,
                                  post_mlp_drop=0, attention_dropout=0, activation_dropout=0,
                                  supported_modality=Modality.IMAGE, modalities=D2vModalitiesConfig(image=image),
                                  clone_batch=1, cls_loss=1, skip_ema=True, seed=1)
        ref = perturb(Data2VecMultiModel(cfg, [Modality.IMAGE], skip_ema=True))
        blocks_out: list[torch.Tensor] = []
        hook = ref.blocks[0].register_forward_hook(lambda mod, inp, out: blocks_out.append(out[0]))
        with torch.no_grad():
            expected = torch.cat([ref.extract_features(reference_mel(w), mask=False, remove_extra_tokens=False)["x"]
                                  for w in x])
        hook.remove()
        first = torch.cat(blocks_out)
        sd = ref.state_dict()
        model_cfg = {"model": {"_name": "data2vec_multi", "depth": depth, "num_heads": heads, "embed_dim": dim}}
        with tempfile.TemporaryDirectory() as tmp:
            files = {"fairseq pre-trained": Path(tmp) / "pretrain.pt", "fairseq fine-tuned": Path(tmp) / "finetune.pt",
                     "Hugging Face": Path(tmp) / "hf" / "model.safetensors"}
            torch.save({"args": None, "cfg": model_cfg, "model": {**sd, "_ema": {k: v for k, v in sd.items() if k.startswith("blocks.")}},
                        "extra_state": {"metrics": {"train": AverageMeter()}}}, files["fairseq pre-trained"])
            encoder = {k: v for k, v in sd.items() if ".decoder." not in k}
            torch.save({"cfg": {"model": {"pretrained_model_args": model_cfg}},
                        "model": {**{"model." + k: v for k, v in encoder.items()}, "fc_norm.weight": torch.ones(dim),
                                  "fc_norm.bias": torch.zeros(dim), "head.weight": torch.zeros(527, dim),
                                  "head.bias": torch.zeros(527)}}, files["fairseq fine-tuned"])
            hf = {}
            for key, tensor in encoder.items():
                old = next(o for o in hf_names if key.startswith(o))
                hf[hf_names[old] + key[len(old):]] = tensor
            files["Hugging Face"].parent.mkdir()
            _save_safetensors(hf, files["Hugging Face"])
            (files["Hugging Face"].parent / "config.json").write_text(json.dumps({"num_heads": heads}))
            for layout, path in files.items():
                found, arch, state = eat.load_eat(path)
                assert found == layout, (found, layout)
                ours = eat.EatBackbone(eat.build_model(arch, state, "parity"), depth, "cls").eval()
                with torch.no_grad():
                    got = ours.tokens(x)
                    ours.layer = 1
                    got_first = ours.tokens(x)
                    ours.layer = depth
                report[f"EAT {label} {layout}: tokens vs official"] = err(expected, got)
                report[f"EAT {label} {layout}: CLS vs official"] = err(expected[:, 0], got[:, 0])
                report[f"EAT {label} {layout}: block 1 vs official"] = err(first, got_first)
            if onnx:
                report[f"EAT {label}: ONNX CLS vs official torch"] = onnx_vs(ours, "eat", dim, expected[:, 0].numpy(), x)
                ours.pooling = "mean"
                report[f"EAT {label}: ONNX patch mean vs official torch"] = onnx_vs(
                    ours, "eat", dim, expected[:, 1:].mean(1).numpy(), x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kaldi", type=Path, required=True, help="folder holding torchaudio/compliance/kaldi.py")
    parser.add_argument("--beats", type=Path, help="folder with the official BEATs.py, backbone.py, modules.py")
    parser.add_argument("--eat", type=Path, help="the official EAT repository's models/ folder")
    parser.add_argument("--onnx", action="store_true", help="also export ours and compare the graph with the official model")
    parser.add_argument("--large", action="store_true", help="also EAT-large (slow)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "parity_beats_eat.json",
                        help="write the errors here")
    args = parser.parse_args()
    report: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        prepare(Path(work), args.kaldi, args.beats, args.eat)
        check_kaldi(report)
        if args.beats:
            check_beats(report, args.onnx)
        if args.eat:
            check_eat(report, args.onnx, args.large)
    for key, value in report.items():
        print(f"{key:70s} {value:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
