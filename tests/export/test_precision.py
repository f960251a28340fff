"""Reduced precision: ``--quantize int8`` (dynamic quantisation, CPUs) and ``--precision fp16``
(GPUs) for any exporter. The signal-processing frontend stays float32 in both; the check against
torch is the embeddings' cosine similarity (``MIN_COSINE``), as exact parity cannot hold.

Speed and detection-score figures: ``benchmarks/precision.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import muq
from export.cli import main as export_main
from export.onnx_export import (
    MIN_COSINE,
    check_similarity,
    cosine_similarity,
    frontend_nodes,
    model_digest,
)
from monitor.errors import ParityError
from monitor.scoring.backbone import Backbone
from tests.export.test_dasheng_m2d_muq import (
    SMALL_MUQ_JSON,
    _randomise,
    _write_safetensors,
)
from tests.synth import machine_sound


@pytest.fixture(scope="module")
def muq_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small MuQ (convolutions + conformer) in its Hugging Face layout, exported three ways."""
    root = tmp_path_factory.mktemp("precision")
    folder = root / "MuQ-small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL_MUQ_JSON))
    torch.manual_seed(0)
    model = _randomise(muq.MuQEncoder(muq.MuQConfig.from_json(SMALL_MUQ_JSON)), 7)
    _write_safetensors(folder / "model.safetensors", model.state_dict())
    out = root / "out"
    for flags in (["--quantize", "int8"], ["--precision", "fp16"]):
        assert export_main(["muq", "--checkpoint", str(folder), "--out", str(out), *flags]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["muq-fp16.onnx", "muq-int8.onnx"]
    return {"int8": out / "muq-int8.onnx", "fp16": out / "muq-fp16.onnx", "folder": folder,
            "model": model}  # type: ignore[dict-item]


def _x() -> np.ndarray:
    return np.stack([machine_sound(s, 10.0, rate=24000) for s in (1, 2, 3)])


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_reduced_precision_is_its_own_model_close_to_fp32(muq_exports: dict, precision: str) -> None:
    reduced = Backbone.load(muq_exports[precision], "cpu")
    model = muq_exports["model"]
    assert reduced.meta.precision == precision and reduced.meta.name == "muq"
    # The fp32 export of the same weights has another model_id: banks are not shared.
    assert reduced.meta.model_id != model_digest(model, reduced.meta.frontend)
    x = _x()
    with torch.no_grad():
        full = model(torch.from_numpy(x)).numpy()
    similarity = cosine_similarity(full.astype(np.float64), reduced.embed(x).astype(np.float64))
    assert np.all(similarity >= MIN_COSINE[precision])
    # Short clips too (the graph keeps the variable length).
    assert np.all(np.isfinite(reduced.embed(x[:, :48000])))


def test_int8_quantises_the_layers_and_leaves_the_frontend_float(muq_exports: dict) -> None:
    graph = onnx.load(str(muq_exports["int8"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeLinear") > 0 and ("MatMulInteger" in ops or "ConvInteger" in ops)
    assert "DFT" in ops
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    mel = [n for n in graph.node if n.op_type == "MatMul" and "mel.filters" in n.input]
    assert mel and "mel.filters" in floats  # the mel product is not quantised


def test_fp16_keeps_io_and_frontend_in_float32(muq_exports: dict) -> None:
    model = onnx.load(str(muq_exports["fp16"]))
    graph = model.graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = {i.name: i.data_type for i in graph.initializer}
    assert types["mel.filters"] == onnx.TensorProto.FLOAT
    assert sum(t == onnx.TensorProto.FLOAT16 for t in types.values()) > 10
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.name != "mel.filters"]
    assert sum(np.prod(i.dims) for i in floats) < 0.05 * sum(np.prod(i.dims) for i in graph.initializer)


def test_a_wrong_reduced_precision_model_fails_the_similarity_check(muq_exports: dict) -> None:
    other = _randomise(muq.MuQEncoder(muq.MuQConfig.from_json(SMALL_MUQ_JSON)), 99)
    meta = Backbone.load(muq_exports["int8"], "cpu").meta
    with pytest.raises(ParityError, match="cosine similarity"):
        check_similarity(other, muq_exports["int8"], meta, torch.from_numpy(_x()[:2]))


def test_frontend_of_a_model_without_weights_is_the_whole_graph() -> None:
    model = onnx.load(str(Path(__file__).resolve().parents[2] / "monitor" / "assets" / "logmel.onnx"))
    assert frontend_nodes(model, set()) == [n.name for n in model.graph.node]


def test_fp16_and_int8_together_is_a_usage_error(muq_exports: dict, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export_main(["muq", "--checkpoint", str(muq_exports["folder"]), "--out", str(tmp_path),
                     "--precision", "fp16", "--quantize", "int8"])
    assert exit_info.value.code == 2
