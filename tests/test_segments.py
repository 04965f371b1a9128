"""Parity in segments: the plan, the segment graphs against the whole graph they stand for (chained in ONNX
Runtime, weight for weight), the tensor manifest against an independent read, and the gate's coverage check on a
real segmented parity run, with a tampered tensor and a missing segment."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from gptoss.errors import GptOssError
from gptoss.files import sha256
from gptoss.formats.synth import synthesize
from gptoss.graphs import weights_file
from gptoss.graphs.export import export, export_segment
from gptoss.graphs.names import INPUT_NAME
from gptoss.graphs.segments import is_model_weight, segment_meta, segment_path, write_manifest
from gptoss.graphs.trace import ExportSpec
from gptoss.model.convert import convert
from gptoss.model.outputs import output_names, segment_input_name, segment_output_names
from gptoss.model.params import Params
from gptoss.proof.compare import Results
from gptoss.proof.driver import JaxRequest
from gptoss.proof.gate import gate
from gptoss.proof.parity import parity, parity_segment
from gptoss.proof.prompts import prompt_inputs
from gptoss.proof.segment_coverage import tensors_path
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.onnx_runtime import ort_session
from gptoss.segment_plan import Segment, parse_segment, plan_segments

LAYERS = 3
LENGTH = 16


def test_plan_names_every_piece_once():
    plan = plan_segments(5, 2)
    assert [s.name for s in plan] == ["embed", "blocks00-01", "blocks02-03", "blocks04-04", "head"]
    assert [(s.first, s.last) for s in plan] == [(0, 0), (1, 2), (3, 4), (5, 5), (6, 6)]
    assert [list(s.blocks) for s in plan] == [[], [0, 1], [2, 3], [4], []]
    assert all(parse_segment(s.name, 5) == s for s in plan)
    for bad in ("blocks03-02", "blocks00-05", "tail", "blocks1"):
        with pytest.raises(GptOssError, match="expected embed, head or blocksA-B"):
            parse_segment(bad, 5)
    with pytest.raises(GptOssError, match="at least one block"):
        plan_segments(5, 0)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """A 3-layer toy (MXFP4 experts), its whole debug and canonical graphs and their one-block segments. The
    weights file threshold is lowered so that the toy's larger tensors (embedding, experts, their per-expert
    views) live in model.onnx.data, as a real model's do."""
    root = tmp_path_factory.mktemp("segments")
    synthesize(root / "checkpoint", "toy", LAYERS, seed=1)
    convert(root / "checkpoint", root / "params.msgpack", LAYERS, weight_format="mxfp4")
    params = Params.open(root / "params.msgpack")
    folder = root / "onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights_file, "EXTERNAL_THRESHOLD_BYTES", 4096)
        specs = {"debug": ExportSpec(LENGTH, True, True), "canonical": ExportSpec(LENGTH)}
        plan = plan_segments(LAYERS, 1)
        for stage, spec in specs.items():
            export(params, folder / f"{stage}.onnx", spec, reuse_weights=stage != "debug")
            for segment in plan:
                export_segment(params, segment_path(folder / f"{stage}.onnx", segment.name), spec, segment)
            write_manifest(folder / f"{stage}.onnx", [s.name for s in plan])
    ids = np.random.default_rng(5).integers(3, params.model_config.vocab_size, (1, LENGTH)).astype(np.int32)
    return {"root": root, "folder": folder, "params": params, "plan": plan, "ids": ids}


def test_segment_outputs_partition_the_whole_graphs():
    from gptoss.formats.synth import preset_config

    cfg = preset_config("toy", 5)
    for blocks in (1, 2, 5):
        per_segment = [segment_output_names(cfg, s.first, s.last, True) for s in plan_segments(5, blocks)]
        flat = [name for names in per_segment for name in names]
        assert len(flat) == len(set(flat)) and set(flat) == set(output_names(cfg, True, True))


@pytest.mark.parametrize("stage", ["debug", "canonical"])
def test_segments_chained_in_onnx_runtime_compute_the_whole_graph(whole, stage):
    """Each segment fed the previous one's ONNX Runtime output: every output equals the whole graph's."""
    folder, cfg = whole["folder"], whole["params"].model_config
    session = ort_session(folder / f"{stage}.onnx")
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {INPUT_NAME: whole["ids"]}), strict=True))
    got: dict[str, np.ndarray] = {}
    for segment in whole["plan"]:
        piece = ort_session(segment_path(folder / f"{stage}.onnx", segment.name))
        names = [o.name for o in piece.get_outputs()]
        assert names == segment_output_names(cfg, segment.first, segment.last, stage == "debug")
        feeds = {INPUT_NAME: whole["ids"]}
        if entering := segment_input_name(segment.first):
            feeds[entering] = got[entering]
        fed = {i.name for i in piece.get_inputs()}
        got |= dict(zip(names, piece.run(None, {k: v for k, v in feeds.items() if k in fed}), strict=True))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_segment_graphs_read_only_their_pieces_weights_at_the_whole_graphs_places(whole):
    folder = whole["folder"]
    graph = onnx.load(str(folder / "debug.onnx"), load_external_data=False).graph
    placed = {t.name: list(t.external_data) for t in graph.initializer if is_model_weight(t.name)}
    assert any(placed.values())  # some weights are in the weights file
    union: set[str] = set()
    for segment in whole["plan"]:
        piece = onnx.load(str(segment_path(folder / "debug.onnx", segment.name)), load_external_data=False)
        assert segment_meta(piece)["name"] == segment.name
        weights = {t.name: list(t.external_data) for t in piece.graph.initializer if is_model_weight(t.name)}
        assert all(rank_of(name) in range(segment.first, segment.last + 1) for name in weights), segment
        assert all(weights[name] == placed[name] for name in weights)  # same file, offset and length
        union |= set(weights)
    assert union == set(placed)


def rank_of(name: str) -> int:
    if name.startswith("embed."):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return LAYERS + 1


def test_manifest_hashes_every_tensor_as_read_with_its_external_data(whole):
    folder = whole["folder"]
    manifest = json.loads((folder / "debug.tensors.json").read_text())
    loaded = onnx.load(str(folder / "debug.onnx"))  # external data read by onnx itself
    expected = {
        t.name: hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest()
        for t in loaded.graph.initializer
        if is_model_weight(t.name)
    }
    assert manifest["tensors"] == expected
    assert manifest["onnx_sha256"] == sha256(folder / "debug.onnx")
    assert manifest["data_sha256"] == sha256(folder / "model.onnx.data")
    assert manifest["segments"] == [s.name for s in whole["plan"]]


def segment_parity(whole: dict, folder: Path, out: Path, stage: str, segment: Segment) -> Path:
    params = whole["params"]
    prompts = prompt_inputs(params, ["Hello world", "The quick brown fox jumps"], [], None, LENGTH)
    csv = out / stage / f"{segment.name}.csv"
    debug = stage == "debug"
    request = JaxRequest(prompts, LENGTH, debug, debug)
    parity_segment(params, segment_path(folder / f"{stage}.onnx", segment.name), Results(csv), request)
    return csv


@pytest.fixture(scope="module")
def segmented(whole, tmp_path_factory) -> dict:
    """Segmented parity of the debug graph, and the whole graph's parity, on the same prompts."""
    out = tmp_path_factory.mktemp("parity")
    csvs = [segment_parity(whole, whole["folder"], out, "debug", s) for s in whole["plan"]]
    params = whole["params"]
    prompts = prompt_inputs(params, ["Hello world", "The quick brown fox jumps"], [], None, LENGTH)
    parity(params, whole["folder"] / "debug.onnx", Results(out / "whole.csv"), JaxRequest(prompts, LENGTH, True, True))
    return {"out": out, "csvs": csvs}


def test_segmented_parity_covers_the_whole_graph_and_the_gate_passes(whole, segmented, tmp_path):
    manifest = whole["folder"] / "debug.tensors.json"
    assert gate(segmented["csvs"], Tolerances(), tmp_path / "v.json", manifests={"debug": manifest}) == 0
    verdict = json.loads((tmp_path / "v.json").read_text())
    graph = {"stage": "debug", "onnx_sha256": sha256(whole["folder"] / "debug.onnx")}
    assert verdict["graphs"] == [graph | {"data_sha256": sha256(whole["folder"] / "model.onnx.data")}]
    assert [s["segment"] for s in verdict["segments"]["debug"]] == sorted(s.name for s in whole["plan"])

    def tensors(paths: list[Path]) -> list[tuple[str, str]]:
        import csv

        rows = [r for p in paths for r in csv.DictReader(open(p))]
        return sorted((r["prompt_id"], r["tensor"]) for r in rows)

    assert tensors(segmented["csvs"]) == tensors([segmented["out"] / "whole.csv"])  # the same rows, in pieces


def test_gate_names_the_segment_and_tensor_whose_bytes_differ(whole, segmented, tmp_path):
    """One tensor of one segment graph tampered (its own copy of a small weight): the segment's parity records
    its sha256, and the gate refuses, naming the segment and the tensor."""
    folder = tmp_path / "onnx"
    shutil.copytree(whole["folder"], folder)
    segment = whole["plan"][2]  # blocks01-01
    path = segment_path(folder / "debug.onnx", segment.name)
    model = onnx.load(str(path), load_external_data=False)
    (sinks,) = [t for t in model.graph.initializer if t.name == "layers.1.attn.sinks"]
    values = onnx.numpy_helper.to_array(sinks)
    sinks.CopyFrom(onnx.numpy_helper.from_array((values.astype("float32") + 0.5).astype(values.dtype), sinks.name))
    onnx.save(model, str(path))
    csvs = [c for c in segmented["csvs"] if c.stem != segment.name]
    csvs.append(segment_parity(whole, folder, tmp_path / "parity", "debug", segment))
    manifests = {"debug": whole["folder"] / "debug.tensors.json"}
    with pytest.raises(GptOssError, match=r"debug segment blocks01-01: tensor layers\.1\.attn\.sinks is not the "):
        gate(csvs, Tolerances(), tmp_path / "v.json", manifests=manifests)
    with pytest.raises(GptOssError, match="debug segment head has no parity CSV"):
        gate(segmented["csvs"][:-1], Tolerances(), tmp_path / "v2.json", manifests=manifests)
    record = json.loads(tensors_path(segmented["csvs"][1]).read_text())
    assert set(record["tensors"]) == {
        n for n in json.loads(manifests["debug"].read_text())["tensors"] if n.startswith("layers.0.")
    }
