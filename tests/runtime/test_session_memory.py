"""OrtSession's memory options: applied to every graph's session, and results unchanged token for
token (against ONNX Runtime's own defaults and against transformers, re-randomized weights); the
once-per-request graphs run row by row into outputs allocated once; the C heap's free pages go back
to the system."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_export.bundle import export_bundle
from blip_runtime import BlipRuntime
from blip_runtime.manifest import load_manifest
from blip_runtime import session as session_module
from blip_runtime.graphs import GraphSpec, TensorSpec
from blip_runtime.session import MEMORY_OPTIONS, OrtSession, _row_wise, release_free_memory
from oracle import assert_close, make_full_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("memory")
    model = make_full_checkpoint("BlipForConditionalGeneration", folder / "ckpt", seed=5, std=0.3)
    processor = transformers.BlipProcessor.from_pretrained(folder / "ckpt")
    export_bundle(folder / "ckpt", folder / "bundle")
    return model, processor, load_manifest(folder / "bundle")


def plain(manifest):
    """ONNX Runtime's own defaults: its options, whole batches, no trimming."""
    return OrtSession(manifest, memory={}, rows_per_run=None, trim=False)


def images(n):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_options_reach_every_session(pair):
    manifest = pair[2]
    assert MEMORY_OPTIONS, "the runtime sets its memory options"
    session = OrtSession(manifest)
    for name, s in session.sessions.items():
        opts = s.get_session_options()
        for key, value in MEMORY_OPTIONS.items():
            if key == "enable_cpu_mem_arena" and name in session_module.feeds_loop_only(manifest):
                continue  # the one per-graph exception, tested below
            got = opts.get_session_config_entry(key) if "." in key else getattr(opts, key)
            assert got == value, f"{name}: {key} = {got!r}, expected {value!r}"
    ort_defaults = OrtSession(manifest, memory={})
    assert all(s.get_session_options().enable_cpu_mem_arena for s in ort_defaults.sessions.values())


def test_arena_for_the_graphs_that_feed_the_loop_only(pair):
    """The runtime's defaults give ONNX Runtime's arena back to the graphs whose outputs all go into
    the decoding loop (cross_kv here), and to no other; explicit memory options hold for every graph."""
    manifest = pair[2]
    assert session_module.feeds_loop_only(manifest) == {"cross_kv"}
    arenas = {n: s.get_session_options().enable_cpu_mem_arena for n, s in OrtSession(manifest).sessions.items()}
    assert arenas == {n: n == "cross_kv" for n in manifest.graphs}, arenas
    explicit = OrtSession(manifest, memory={"enable_cpu_mem_arena": False})
    assert not any(s.get_session_options().enable_cpu_mem_arena for s in explicit.sessions.values())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tokens_unchanged(pair, num_beams):
    model, processor, manifest = pair
    imgs = images(2)
    gen = dict(max_new_tokens=12, min_new_tokens=12, num_beams=num_beams)
    ours = BlipRuntime(manifest, OrtSession(manifest)).caption_tokens(imgs, **gen)
    ort_defaults = BlipRuntime(manifest, plain(manifest)).caption_tokens(imgs, **gen)
    assert ours == ort_defaults
    for i, img in enumerate(imgs):
        with torch.inference_mode():
            ref = model.generate(**processor(images=[img], return_tensors="pt"), **gen)[0].tolist()
        assert list(ours[i]) == ref, f"row {i}: ours {list(ours[i])} vs transformers {ref}"
    assert len({tuple(r) for r in ours}) > 1 or len(set(ours[0])) > 2, "outputs vary: the comparison means something"


def test_graph_outputs_equal_ort_defaults(pair):
    manifest = pair[2]
    rt = BlipRuntime(manifest, OrtSession(manifest))
    pixels = rt.pixels(images(2))
    ours = rt.session.run("vision", {"pixel_values": pixels})
    theirs = plain(manifest).run("vision", {"pixel_values": pixels})
    for name in ours:
        assert_close(ours[name], theirs[name], 1e-6, f"vision {name}, memory options vs ONNX Runtime defaults")


def test_bad_option_is_one_clear_line(pair):
    with pytest.raises(ValueError, match="memory option 'no_such_option': expected a SessionOptions attribute"):
        OrtSession(pair[2], memory={"no_such_option": 1})


def test_row_wise_graphs_are_the_once_per_request_image_graphs(pair):
    manifest = pair[2]
    assert OrtSession(manifest, rows_per_run=2).chunked == {"vision": 2, "cross_kv": 2}
    assert OrtSession(manifest, rows_per_run=None).chunked == {}
    assert not _row_wise(manifest.graphs["decoder_step"]), "the decoding loop's step runs whole batches"
    text = GraphSpec("text", (TensorSpec("input_ids", "int64", ("batch", "text"), 99),),
                     (TensorSpec("hidden", "float32", ("batch", "text", 8)),))
    assert not _row_wise(text), "a graph over token ids runs whole batches"
    rows = GraphSpec("per_row", (TensorSpec("x", "float32", ("rows", 4)),), (TensorSpec("y", "float32", ("rows", 4)),))
    assert not _row_wise(rows), "only inputs and outputs that all lead with the batch axis are split"


def _count_rows(session: OrtSession, graph: str) -> list[int]:
    """Rows of every ONNX Runtime call of `graph`, plain or bound (appended as they run)."""
    seen, inner = [], session.sessions[graph]
    run, io_binding = inner.run, inner.io_binding

    def counted_binding():
        binding = io_binding()
        bind = binding.bind_cpu_input
        binding.bind_cpu_input = lambda name, value: (seen.append(len(value)) if name == first else None, bind(name, value))[1]
        return binding

    first = session.manifest.graphs[graph].inputs[0].name
    inner.run = lambda names, feeds, *a: (seen.append(len(feeds[first])), run(names, feeds, *a))[1]
    inner.io_binding = counted_binding
    return seen


@pytest.mark.parametrize("rows", [1, 2])
def test_row_wise_runs_equal_whole_batches(pair, rows):
    """5 images, 1 or 2 rows per ONNX Runtime call (2: a last chunk of 1): every output equal to the
    whole batch's, and no call sees more rows than asked."""
    manifest = pair[2]
    whole = plain(manifest)
    split = OrtSession(manifest, rows_per_run=rows)
    pixels = BlipRuntime(manifest, whole).pixels(images(5))
    seen = {g: _count_rows(split, g) for g in ("vision", "cross_kv")}
    want = whole.run("vision", {"pixel_values": pixels})
    got = split.run("vision", {"pixel_values": pixels})
    assert seen["vision"] == [rows] * (5 // rows) + [5 % rows] * (5 % rows > 0)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
        assert_close(got[name], want[name], 1e-6, f"vision {name}, {rows} row(s) per run vs the whole batch")
    states = want["image_embeds"]
    want, got = whole.run("cross_kv", {"encoder_states": states}), split.run("cross_kv", {"encoder_states": states})
    assert max(seen["cross_kv"]) == rows and sum(seen["cross_kv"]) == 5
    for name in want:
        assert_close(got[name], want[name], 1e-6, f"cross_kv {name}, {rows} row(s) per run vs the whole batch")
    assert np.abs(want["cross_key.0"][0] - want["cross_key.0"][1]).max() > 1e-3, "rows differ: the test means something"


def test_row_wise_run_learns_an_output_shape_no_input_fixes(pair):
    """An output axis named nowhere among the inputs: the first chunk runs plainly and gives it."""
    manifest = pair[2]
    spec = manifest.graphs["vision"]
    outputs = tuple(TensorSpec(t.name, t.dtype, (t.shape[0], *("tokens" if isinstance(a, int) else a for a in t.shape[1:2]),
                                                   *t.shape[2:]), t.high) for t in spec.outputs)
    renamed = GraphSpec(spec.name, spec.inputs, outputs, spec.doc, spec.roles)
    split = OrtSession(manifest, rows_per_run=2)
    split.manifest = type(manifest)(manifest.folder, manifest.data, {**manifest.graphs, "vision": renamed}, manifest.dims)
    seen = _count_rows(split, "vision")
    pixels = BlipRuntime(manifest, split).pixels(images(3))
    got = split.run("vision", {"pixel_values": pixels})
    want = plain(manifest).run("vision", {"pixel_values": pixels})
    assert seen == [2, 1]
    for name in want:
        assert_close(got[name], want[name], 1e-6, f"vision {name}, shape learnt from the first chunk")


@pytest.mark.parametrize("kwargs, message", [
    ({"rows_per_run": 0}, r"rows_per_run=0: expected an int >= 1 or None"),
    ({"rows_per_run": 1.5}, r"rows_per_run=1.5: expected an int >= 1 or None"),
    ({"trim": "yes"}, r"trim='yes': expected True or False"),
])
def test_bad_row_or_trim_option_is_one_clear_line(pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        OrtSession(pair[2], **kwargs)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_release_free_memory_returns_freed_heap_pages():
    """64 KiB blocks come from the heap (under glibc's mmap threshold), and freed ones below a live
    block stay resident until trimmed."""
    import ctypes

    if session_module._malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library (not glibc)")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    release_free_memory()
    blocks = [libc.malloc(1 << 16) for _ in range(1024)]  # 64 MiB
    for b in blocks:
        ctypes.memset(b, 1, 1 << 16)
    for b in blocks[:-1]:
        libc.free(b)
    before = _rss_kib()
    release_free_memory()
    after = _rss_kib()
    libc.free(blocks[-1])
    print(f"RSS before the trim {before} KiB, after {after} KiB")
    assert before - after > 32 * 1024, f"the trim released {before - after} KiB of 64 MiB freed"


def test_int8_cpu_rows_are_each_image_alone(pair, tmp_path):
    """int8-cpu quantizes activations with one scale per run: run whole, an image's vision output
    depends on the other images of its batch; run row by row it is the image's own, as alone."""
    from blip_export.precision import convert_bundle

    convert_bundle(pair[2].folder, tmp_path / "int8", "int8-cpu", images(3), bound=None)
    manifest = load_manifest(tmp_path / "int8")
    imgs = images(3)
    imgs[1] = (imgs[1] // 8).astype(np.uint8)  # a dark image: its own activation range is narrower
    split, whole = OrtSession(manifest, rows_per_run=1), plain(manifest)
    pixels = BlipRuntime(manifest, whole).pixels(imgs)
    rows = split.run("vision", {"pixel_values": pixels})["image_embeds"]
    batch = whole.run("vision", {"pixel_values": pixels})["image_embeds"]
    for i in range(len(imgs)):
        alone = whole.run("vision", {"pixel_values": pixels[i : i + 1]})["image_embeds"][0]
        assert_close(rows[i], alone, 1e-7, f"int8-cpu vision row {i}, row by row vs alone")
    assert np.abs(batch - rows).max() > 0, "whole batches share one scale (the comparison means something)"


def test_which_graphs_feed_the_loop_only():
    """feeds_loop_only on every family's graph tables: BLIP's cross_kv (caption, VQA), BLIP-2 T5's
    t5_cross_kv; none where no graph's outputs all go into the loop (retrieval, BLIP-2 OPT, whose
    Q-Former output goes back to the caller too and whose step takes its own outputs back)."""
    from types import SimpleNamespace

    from blip_runtime.families.blip.graphs import Dims, graphs as blip_graphs
    from blip_runtime.families.blip2.graphs import Blip2Dims, graphs as blip2_graphs

    def of(table):
        return session_module.feeds_loop_only(SimpleNamespace(graphs=table))

    dims = Dims(image_size=32, num_image_tokens=5, vision_hidden=16, text_hidden=16, num_layers=2, num_heads=2,
                head_dim=8, vocab_size=50, itc_dim=8)
    for keys_transposed in (True, False):
        assert of(blip_graphs(dims, {"caption"}, keys_transposed=keys_transposed)) == {"cross_kv"}
        assert of(blip_graphs(dims, {"vqa"}, keys_transposed=keys_transposed)) == {"cross_kv"}
    assert of(blip_graphs(dims, {"itm", "itc"})) == set()
    lm = dict(image_size=32, num_image_tokens=5, vision_hidden=8, num_query_tokens=3, qformer_hidden=8,
              qformer_vocab_size=50, lm_hidden=6, lm_layers=2, lm_heads=2, lm_head_dim=3, vocab_size=40,
              image_token_id=39)
    assert of(blip2_graphs(Blip2Dims(lm="opt", max_position_embeddings=64, **lm), ["generate"])) == set()
    assert of(blip2_graphs(Blip2Dims(lm="t5", **lm), ["generate"])) == {"t5_cross_kv"}
    assert of(blip2_graphs(Blip2Dims(itc_dim=4, **lm), ["itm", "itc"])) == set()


def test_loop_input_arena_only_row_by_row(pair):
    """The arena goes back only to graphs run row by row: whole batches (rows_per_run=None) would keep
    the largest batch's blocks for the session's life. loop_input_arena=True gives it back under
    explicit memory options too."""
    manifest = pair[2]
    arena = lambda s: {n for n, x in s.sessions.items() if x.get_session_options().enable_cpu_mem_arena}  # noqa: E731
    assert arena(OrtSession(manifest, rows_per_run=None)) == set()
    assert arena(OrtSession(manifest, memory={"enable_cpu_mem_arena": False}, loop_input_arena=True)) == {"cross_kv"}
    assert arena(OrtSession(manifest, loop_input_arena=False)) == set()
    with pytest.raises(ValueError, match="loop_input_arena"):
        OrtSession(manifest, loop_input_arena="yes")


def test_heap_trimmed_after_multi_row_runs_outside_the_loop_only(pair, monkeypatch):
    """A request of one row leaves its freed blocks for the next one (no trim, whose pages would be
    faulted in again); a run of more rows than TRIM_AFTER_ROWS outside the decoding loop trims, and
    the loop's steps never do. trim=False never trims."""
    manifest = pair[2]
    session = OrtSession(manifest)
    trims = []
    monkeypatch.setattr(session_module, "release_free_memory", lambda: trims.append(1))
    rt = BlipRuntime(manifest, session)
    trimmed = []
    run = session.run
    session.run = lambda graph, feeds, *a, **k: (trims.clear(), run(graph, feeds, *a, **k),
                                                 trimmed.append((graph, len(next(iter(feeds.values()))), bool(trims))))[1]
    rt.caption_tokens(images(1), max_new_tokens=4, min_new_tokens=4)
    assert trimmed and not any(t for _, _, t in trimmed), f"a one-row request trimmed: {trimmed}"
    trimmed.clear()
    rt.caption_tokens(images(2), max_new_tokens=4, min_new_tokens=4)
    assert {g for g, _, t in trimmed if t} == {"vision", "cross_kv"}, trimmed
    assert all(not t for g, _, t in trimmed if g == "decoder_step"), "a decoding step trimmed"
    assert session_module.TRIM_AFTER_ROWS == 1
    untrimmed = OrtSession(manifest, trim=False)
    trims.clear()
    BlipRuntime(manifest, untrimmed).caption_tokens(images(2), max_new_tokens=4, min_new_tokens=4)
    assert not trims
