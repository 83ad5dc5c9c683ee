"""Experiment (h) of ``moekit compare``: the GCIDE corpus and the ceiling-first grid.

Verified, with no network and no real GCIDE: a synthetic .deb built here (an ``ar`` archive
holding a ``data.tar.xz`` with a gzip ``gcide.dict.dz`` and its dictd index) goes through the
stdlib reader and the stripping rules to known prose; each rule has a case of its own (header,
banner, source tags, pronunciation markup, braces, letter codes, layout, non-UTF-8 bytes); a
wrong checksum, a missing apt-get and a failed download each give a clear error naming the
command and how to supply the .deb by hand (``subprocess.run`` is monkeypatched: apt-get is
never run); the prepared text is cached with its SHA-256 and reused. The grid's models stand at
equal active compute (dense) and equal FFN parameters (dense-wide = the MoE's experts); the
held-out set is fixed; a step budget of a whole epoch is refused. End to end (slow): the quick
grid on the synthetic corpus trains the MoE only when the ceiling allows, stops with 130 on
Ctrl-C, writes results_h.md and h_text.png, prints --json under "h", and reuses every run.

Run: ``python -m pytest tests/test_text_experiment.py``
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moekit.experiments.compare.run as compare_run
import moekit.experiments.text.data as text_data
from moekit.cli.main import main
from moekit.experiments.text.data import (
    GCIDE_DEB,
    GCIDE_DEB_ENV,
    GcideUnavailable,
    clean_entry,
    decode_dictd_number,
    gcide_prose,
    paragraphs_as_lines,
    plain_letters,
    prepare_gcide,
    read_ar_members,
    read_dictd,
    strip_banner,
    strip_braces,
    strip_pronunciation,
    strip_source_tags,
)
from moekit.experiments.text.run import (
    DENSE,
    MOE,
    WIDE,
    TextGrid,
    default_config,
    epoch_use,
    heldout_batches,
    models,
    run_text,
    train_config,
)
from moekit.models.lm import MoETransformerLM
from moekit.training.data import ByteTokenizer, TextDataset

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

HEADER = (
    "00-database-info\n   This file was converted from the original database\n\n"
    " Begin file 1 of 26:  Letter A (Version 0.48) \n   GCIDE is free software; GNU General Public License\n"
    "   Last edit October 6, 2002.\n"
)
ENTRIES = [
    # (headwords, raw entry, the prose it becomes)
    (("Lariat",),
     'Lariat \\Lar"i*at\\ (l[a^]r"[i^]*[a^]t), n. [Sp. la reata the\n   rope. Cf. {Reata}.]\n'
     "   A long, slender rope; -- used as a lasso. [Mexico & Western U.S.]\n   [1913 Webster]\n",
     "Lariat, n. [Sp. la reata the rope. Cf. Reata.] A long, slender rope; -- used as a lasso. "
     "[Mexico & Western U.S.]"),
    (("Laridae", "gull family"),
     "Laridae \\Laridae\\ prop. n.\n   The natural family of gulls ({Larid[ae]}).\n\n"
     "   Syn: family {Laridae}.\n        [WordNet 1.5 +PJC]\n",
     "Laridae prop. n. The natural family of gulls (Laridae).\nSyn: family Laridae."),
    (("Larrikin",),
     'Larrikin \\Lar"ri*kin\\, n. (Zool.)\n   A rowdy. [Colloq.]\n\n'
     "         Mobs of unruly larrikins.                --Sydney Daily\n"
     "                                                  Telegraph.\n         [Webster 1913 Suppl.]\n",
     "Larrikin, n. (Zool.) A rowdy. [Colloq.]\nMobs of unruly larrikins. --Sydney Daily Telegraph."),
]

RAW_ENTRIES = [(headwords, raw) for headwords, raw, _ in ENTRIES]


def encode_dictd_number(value: int) -> str:
    digits = ""
    while True:
        value, digit = divmod(value, 64)
        digits = B64[digit] + digits
        if value == 0:
            return digits


def filler_entries(count: int) -> list[tuple[tuple[str, ...], str]]:
    """Plain entries in dictionary style, enough text for the quick grid's step budget."""
    words = ["river", "stone", "lantern", "meadow", "harbor", "candle", "orchard", "thunder", "willow", "copper"]
    entries = []
    for i in range(count):
        word = f"{words[i % len(words)]}{i}"
        body = (f"{word.capitalize()} \\{word.capitalize()}\\, n.\n   A {words[(i * 7) % len(words)]} near the "
                f"{words[(i * 3) % len(words)]}; as, the {word} of the {words[(i * 5) % len(words)]}.\n"
                "   [1913 Webster]\n")
        entries.append(((word,), body))
    return entries


def build_dictd(entries: list[tuple[tuple[str, ...], str]], non_utf8: bytes = b"") -> tuple[bytes, str]:
    """A dictd database: the entries separated by a newline, and the index pointing at them."""
    data, index = bytearray(), []
    for headwords, text in [(("00-database-info", "00-web1913-info"), HEADER), *entries]:
        raw = text.encode("utf-8")
        if headwords == ("Lariat",):
            raw += non_utf8
        offset = len(data)
        data += raw + b"\n"
        index += [f"{word}\t{encode_dictd_number(offset)}\t{encode_dictd_number(len(raw))}" for word in headwords]
    return bytes(data), "\n".join(sorted(index)) + "\n"


def build_deb(path: Path, entries: list[tuple[tuple[str, ...], str]], non_utf8: bytes = b"") -> str:
    """A .deb as Debian builds it (ar: debian-binary, control.tar.xz, data.tar.xz); returns its sha256."""
    dict_bytes, index_text = build_dictd(entries, non_utf8)
    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:xz") as archive:
        for name, payload in (("./usr/share/dictd/gcide.dict.dz", gzip.compress(dict_bytes)),
                              ("./usr/share/dictd/gcide.index", index_text.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    control_tar = io.BytesIO()
    with tarfile.open(fileobj=control_tar, mode="w:xz"):
        pass
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", control_tar.getvalue()),
               ("data.tar.xz", data_tar.getvalue())]
    blob = bytearray(b"!<arch>\n")
    for name, payload in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        assert len(header) == 60
        blob += header + payload + (b"\n" if len(payload) % 2 else b"")
    path.write_bytes(bytes(blob))
    return hashlib.sha256(bytes(blob)).hexdigest()


@pytest.fixture
def synthetic_deb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A synthetic dict-gcide .deb whose checksum the module expects (GCIDE_DEB_SHA256 patched)."""
    path = tmp_path / "synthetic" / GCIDE_DEB
    path.parent.mkdir()
    sha256 = build_deb(path, [*RAW_ENTRIES, *filler_entries(400)])
    monkeypatch.setattr(text_data, "GCIDE_DEB_SHA256", sha256)
    monkeypatch.delenv(GCIDE_DEB_ENV, raising=False)
    return path


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"subprocess.run must not be called: {args}")


# --- the dictd database ---------------------------------------------------------------------


def test_dictd_numbers_are_base64_most_significant_first():
    # From the real gcide.index: entry "0" at 5I, "100" at BQ+.
    assert decode_dictd_number("5I") == 57 * 64 + 8 == 3656
    assert decode_dictd_number("BQ+") == 1 * 64**2 + 16 * 64 + 62
    assert all(decode_dictd_number(encode_dictd_number(n)) == n for n in (0, 1, 63, 64, 39_952_096))
    with pytest.raises(ValueError, match="not a dictd base-64 number"):
        decode_dictd_number("A-B")


def test_entries_come_once_in_file_order_and_non_utf8_bytes_are_cp1252():
    dict_bytes, index_text = build_dictd(RAW_ENTRIES, non_utf8=b"\x92")
    entries, fallback = read_dictd(dict_bytes, index_text)
    assert [e.headwords[0] for e in entries] == ["00-database-info", "Lariat", "Laridae", "Larrikin"]
    assert entries[2].headwords == ("Laridae", "gull family")  # two index lines, one entry
    assert fallback == 1 and entries[1].text.endswith("\u2019")  # cp1252 0x92: right single quote


def test_ar_reader_reads_padded_members_and_rejects_other_files(tmp_path):
    sha = build_deb(tmp_path / "x.deb", RAW_ENTRIES)
    members = read_ar_members((tmp_path / "x.deb").read_bytes())
    assert list(members) == ["debian-binary", "control.tar.xz", "data.tar.xz"] and len(sha) == 64
    assert members["debian-binary"] == b"2.0\n"
    with pytest.raises(ValueError, match="not an ar archive"):
        read_ar_members(b"PK\x03\x04 a zip file")


# --- the stripping rules, one case each -----------------------------------------------------


def test_header_entries_are_dropped():
    entries, _ = read_dictd(*build_dictd(RAW_ENTRIES))
    prose = gcide_prose(entries)
    assert "database" not in prose and "General Public License" not in prose and "Last edit" not in prose
    assert prose.startswith("Lariat, n.")


def test_file_banner_is_dropped_up_to_its_last_edit_line():
    text = ("Before.\n Begin file 2 of 26:  Letter B (Version 0.48)\n   GCIDE is free software\n"
            "   Last edit October 6, 2002.\nAfter.\n")
    assert strip_banner(text) == "Before.\n\nAfter.\n"
    with pytest.raises(ValueError, match="without its 'Last edit' line"):
        strip_banner(" Begin file 3 of 26: Letter C\nlicense text with no end\n")


@pytest.mark.parametrize(
    "tag",
    ["[1913 Webster]", "[WordNet 1.5]", "[WordNet 1.5 +PJC]", "[Webster 1913 Suppl.]", "[PJC]",
     "[1913 Webster + WordNet 1.5]", "[1913\n        Webster +PJC]", "[RP + PJC]", "[Century Dict. 1906]",
     "[WordNet sense 1, 2]", "[AS]", "[+PJC]"],
)
def test_source_tags_are_dropped(tag):
    assert strip_source_tags(f"To frolic. {tag}\n") == "To frolic. \n"


def test_usage_labels_stay_and_an_unclosed_source_tag_goes():
    text = "To frolic. [Colloq.] [Obs.] [R.] --Dickens.\n"
    assert strip_source_tags(text) == text
    assert strip_source_tags("Syn: hitless. [WordNet 1.5\n2. Next sense.") == "Syn: hitless.\n2. Next sense."


def test_headword_pronunciation_markup_and_respelling_are_dropped():
    assert strip_pronunciation('Lariat \\Lar"i*at\\ (l[a^]r"[i^]*[a^]t), n.') == "Lariat, n."
    # A parenthesis without respelling marks is prose (a field label), and stays.
    assert strip_pronunciation('Larine \\La"rine\\ (Zool.) a.') == "Larine (Zool.) a."
    # The markup may wrap onto the next line.
    assert strip_pronunciation('amberfish, Amber fish \\Am"ber\nfish`\\. (Zool.)') == "amberfish, Amber fish. (Zool.)"


def test_braces_are_dropped_and_their_text_kept():
    assert strip_braces("See {Lark bunting} ({C12H25OH}).") == "See Lark bunting (C12H25OH)."


def test_letter_codes_become_plain_letters():
    assert plain_letters("Larid[ae], l[=a]c, l[aum]rka, [AE]on, fa[,c]ade, se[~n]or, [imac]") == \
        "Laridae, lac, larka, AEon, facade, senor, i"
    assert plain_letters("[Obs.] [root] [2]") == "[Obs.] [root] [2]"  # labels and rare codes stay


def test_paragraphs_become_single_lines():
    text = "   A long\n   rope.\n\n         Mobs.      --Sydney\n            Telegraph.\n  \n\n"
    assert paragraphs_as_lines(text) == ["A long rope.", "Mobs. --Sydney Telegraph."]


def test_clean_entry_applies_every_rule():
    for _, raw, prose in ENTRIES:
        assert "\n".join(clean_entry(raw)) == prose


# --- fetching, checksums, the cache ---------------------------------------------------------


def test_synthetic_deb_is_prepared_and_cached(tmp_path, synthetic_deb, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    prepared = prepare_gcide(cache, synthetic_deb)
    text = prepared.path.read_text(encoding="utf-8")
    expected = "\n\n".join(prose for _, _, prose in ENTRIES)
    assert text.startswith(expected + "\n\nRiver0, n. A river near the river; as, the river0 of the river.\n\n")
    assert prepared.entries == 1 + len(ENTRIES) + 400 and prepared.non_utf8_bytes == 0
    assert prepared.sha256 == hashlib.sha256(text.encode()).hexdigest() and prepared.deb == synthetic_deb
    assert (cache / (prepared.path.name + ".sha256")).read_text().split()[0] == prepared.sha256
    # Reused: no .deb needed, nothing downloaded.
    again = prepare_gcide(cache)
    assert (again.path, again.sha256, again.deb) == (prepared.path, prepared.sha256, None)
    # A cached text that no longer matches its hash is prepared again.
    prepared.path.write_text("tampered", encoding="utf-8")
    assert prepare_gcide(cache, synthetic_deb).sha256 == prepared.sha256


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.delenv(GCIDE_DEB_ENV, raising=False)
    build_deb(tmp_path / "other.deb", RAW_ENTRIES)  # a well-formed .deb, not the expected one
    with pytest.raises(ValueError) as caught:
        prepare_gcide(tmp_path / "cache", tmp_path / "other.deb")
    assert str(caught.value).startswith(f"--gcide-deb {tmp_path / 'other.deb'}: sha256 ")
    assert "is not that of dict-gcide_0.48.5+nmu2_all.deb (7b0af5cf" in str(caught.value)
    assert not (tmp_path / "cache" / "gcide-prose-v1.txt").exists()
    # The environment variable is named when it points to nothing.
    monkeypatch.setenv(GCIDE_DEB_ENV, str(tmp_path / "missing.deb"))
    with pytest.raises(ValueError, match=f"^{GCIDE_DEB_ENV}=.*missing.deb: no such file"):
        prepare_gcide(tmp_path / "cache")


def test_missing_apt_get_names_the_command_and_the_way_by_hand(tmp_path, monkeypatch):
    monkeypatch.delenv(GCIDE_DEB_ENV, raising=False)

    def missing(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(GcideUnavailable) as caught:
        prepare_gcide(tmp_path / "cache")
    message = str(caught.value)
    assert "`apt-get download dict-gcide=0.48.5+nmu2` could not run: apt-get is not installed" in message
    assert "--gcide-deb PATH" in message and GCIDE_DEB_ENV in message and str(tmp_path / "cache") in message


def test_failed_download_reports_its_status_and_output(tmp_path, monkeypatch):
    monkeypatch.delenv(GCIDE_DEB_ENV, raising=False)
    calls = []

    def offline(command, **kwargs):
        calls.append((command, kwargs["cwd"]))
        return subprocess.CompletedProcess(command, 100, "", "E: Failed to fetch http://deb.debian.org/...\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(GcideUnavailable, match=r"exited with status 100 without .*: E: Failed to fetch .*--gcide-deb"):
        prepare_gcide(tmp_path / "cache")
    assert calls == [(["apt-get", "download", "dict-gcide=0.48.5+nmu2"], tmp_path / "cache")]


def test_downloaded_deb_is_checked_then_used(tmp_path, synthetic_deb, monkeypatch):
    def apt_get(command, cwd, **kwargs):  # what apt-get download does: the .deb in the working directory
        (Path(cwd) / GCIDE_DEB).write_bytes(synthetic_deb.read_bytes())
        return subprocess.CompletedProcess(command, 0, "Get:1 ...", "")

    monkeypatch.setattr(subprocess, "run", apt_get)
    prepared = prepare_gcide(tmp_path / "cache")
    assert prepared.deb == tmp_path / "cache" / GCIDE_DEB and prepared.num_bytes > 0


def test_environment_variable_supplies_the_deb(tmp_path, synthetic_deb, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setenv(GCIDE_DEB_ENV, str(synthetic_deb))
    assert prepare_gcide(tmp_path / "cache").deb == synthetic_deb


def test_cli_reports_fetch_and_checksum_errors_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(GCIDE_DEB_ENV, raising=False)
    monkeypatch.setattr(subprocess, "run", lambda command, **k: (_ for _ in ()).throw(FileNotFoundError(command[0])))
    out, cache = tmp_path / "h", tmp_path / "cache"
    assert main(["compare", "--experiments", "h", "--quick", "--out", str(out), "--data-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moekit compare: error: `apt-get download dict-gcide=0.48.5+nmu2` could not run")
    assert "Traceback" not in err
    build_deb(tmp_path / "other.deb", RAW_ENTRIES)
    args = ["compare", "--experiments", "h", "--quick", "--out", str(out), "--gcide-deb", str(tmp_path / "other.deb")]
    assert main(args) == 2
    assert "is not that of dict-gcide_0.48.5+nmu2_all.deb" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiments", "a", "--steps-h", "10"], "add h to --experiments"),
        (["--experiments", "a", "--gcide-deb", "x.deb"], "add h to --experiments"),
        (["--experiments", "a", "--jobs", "2"], "add g or h to --experiments"),
        (["--experiments", "h", "--steps-a", "10"], "use --steps-g or --steps-h"),
        (["--experiments", "h,z"], "choose from a,b,c,d,e,f,g,h,i"),
    ],
)
def test_compare_h_flags_are_checked(tmp_path, capsys, args, message):
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


# --- the grid ---------------------------------------------------------------------------------


def test_models_are_dense_at_equal_active_compute_and_wide_with_the_moe_expert_parameters():
    config = default_config()
    grid = models(config)
    assert grid[MOE].arch == "moe" and grid[DENSE].arch == grid[WIDE].arch == "dense"
    assert grid[DENSE] == grid[MOE].as_dense()
    # SwiGLU FFN parameters: 3·D·F per dense FFN, 3·D·d_ff per expert.
    moe_experts = config.num_experts * 3 * config.d_model * config.d_ff
    assert 3 * config.d_model * grid[WIDE].ffn_width(0) == moe_experts
    assert grid[DENSE].ffn_width(0) == config.top_k * config.d_ff + round(config.num_experts / 3)
    for name in (DENSE, WIDE):  # everything but the FFN is the MoE's
        assert {k: v for k, v in grid[name].to_dict().items() if k not in ("arch", "moe", "dense_d_ff")} == \
            {k: v for k, v in grid[MOE].to_dict().items() if k not in ("arch", "moe", "dense_d_ff")}


def test_models_of_one_seed_share_batches_and_non_expert_weights():
    # Paired seeds: one TrainConfig per seed (the batches and their order) for every model, and
    # the same torch.manual_seed gives every model the same embeddings and attention weights.
    config = replace(default_config(quick=True), corpus="/data/gcide.txt", corpus_sha256="0" * 64)
    train0, train1 = train_config(config, 0), train_config(config, 1)
    assert train0.data == "/data/gcide.txt" and train0.seed != train1.seed
    assert replace(train1, seed=train0.seed) == train0
    assert train0.max_minutes is None and train0.steps == config.steps
    grid = models(config)
    built = {}
    for name in (DENSE, MOE, WIDE):
        torch.manual_seed(train0.seed)
        built[name] = MoETransformerLM(grid[name])
    for name, model in built.items():
        for part in ("embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"):
            assert torch.equal(model.state_dict()[part], built[DENSE].state_dict()[part]), (name, part)
    sizes = {name: sum(p.numel() for n, p in built[name].named_parameters() if "ffn" in n and "norm" not in n)
             for name in (MOE, WIDE)}
    assert sizes[WIDE] == sizes[MOE] - config.num_experts * config.d_model  # the experts' parameters, no router


def test_epoch_use_counts_tokens_seen_against_the_training_split():
    config = replace(default_config(), steps=1000, batch_size=16, seq_len=128)
    use = epoch_use(config, 20_480_000)
    assert use["tokens_seen"] == 2_048_000 and use["train_tokens"] == 18_432_000
    assert use["epochs"] == pytest.approx(2_048_000 / 18_432_000)
    r = use["epochs"]
    assert use["share_seen"] == pytest.approx(1 - math.exp(-r))
    assert use["share_seen_twice_or_more"] == pytest.approx(1 - math.exp(-r) * (1 + r))


def test_a_step_budget_of_an_epoch_or_more_is_refused(tmp_path, synthetic_deb):
    size = len(prepare_gcide(tmp_path / "cache", synthetic_deb).path.read_bytes())
    config = default_config(quick=True)
    steps = int(0.9 * size) // (config.batch_size * config.seq_len) + 1
    with pytest.raises(ValueError, match=rf"--steps-h {steps} is invalid: .* would repeat the training split"):
        run_text(tmp_path / "h", seeds=1, steps=steps, quick=True, data_dir=tmp_path / "cache")
    assert not (tmp_path / "h").exists()


def test_heldout_set_is_fixed_windows_of_the_validation_split(tmp_path, synthetic_deb):
    prepared = prepare_gcide(tmp_path / "cache", synthetic_deb)
    config = default_config(quick=True)
    dataset = TextDataset.load(prepared.path, config.seq_len, ByteTokenizer())
    first, second = heldout_batches(dataset, config), heldout_batches(dataset, config)
    assert sum(x.shape[0] for x, _ in first) == config.heldout_windows
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    val = bytes(dataset.val_tokens.tolist())
    for inputs, targets in first:
        for row_in, row_target in zip(inputs, targets, strict=True):
            assert bytes(row_in.tolist()) in val and torch.equal(row_in[1:], row_target[:-1])


def test_grid_needs_the_prepared_corpus():
    with pytest.raises(ValueError, match="TextConfig.corpus and corpus_sha256"):
        TextGrid(Path("/tmp/unused"), default_config(quick=True))


@pytest.mark.slow
def test_quick_grid_trains_the_moe_only_above_the_ceiling_threshold(tmp_path, synthetic_deb, monkeypatch):
    cache = tmp_path / "cache"
    prepare_gcide(cache, synthetic_deb)
    trained: list[str] = []
    real_train = compare_run.train
    monkeypatch.setattr(compare_run, "train", lambda *a, **k: trained.append(Path(a[2]).name) or real_train(*a, **k))
    out = tmp_path / "h"
    # A threshold no ceiling reaches: dense and dense-wide only; the ceiling is the result.
    skipped = run_text(out, seeds=2, quick=True, data_dir=cache,
                       config=replace(default_config(quick=True), ceiling_threshold=math.inf))
    assert skipped["moe"] is None and set(skipped["models"]) == {DENSE, WIDE} and len(trained) == 4
    gains = [d - w for d, w in zip(skipped["models"][DENSE]["heldout_loss"], skipped["models"][WIDE]["heldout_loss"],
                                   strict=True)]
    assert skipped["ceiling"]["per_seed"] == gains and not skipped["ceiling"]["reached"]
    text = (out / "results_h.md").read_text()
    assert "the MoE runs were skipped" in text and "## MoE − dense" not in text
    # Any ceiling reaches -inf: the same dense and dense-wide runs are reused, the MoE trains.
    trained.clear()
    ran = run_text(out, seeds=2, quick=True, data_dir=cache,
                   config=replace(default_config(quick=True), ceiling_threshold=-math.inf))
    assert len(trained) == 2 and all(name.startswith("moe-s") for name in trained)
    assert ran["models"][DENSE]["heldout_loss"] == skipped["models"][DENSE]["heldout_loss"]
    diffs = [m - d for m, d in zip(ran["models"][MOE]["heldout_loss"], ran["models"][DENSE]["heldout_loss"],
                                   strict=True)]
    assert ran["moe"]["moe_minus_dense"] == diffs and ran["ceiling"]["reached"]
    assert ran["epoch_use"]["epochs"] < 1
    text = (out / "results_h.md").read_text()
    for part in ("## Held-out loss", "## The ceiling", "## MoE − dense (paired)", "acceptance check", "h_text.png"):
        assert part in text
    assert (out / "h_text.png").stat().st_size > 0


@pytest.mark.slow
def test_compare_h_quick_end_to_end(tmp_path, capsys, synthetic_deb, monkeypatch):
    real_train = compare_run.train
    calls: list[str] = []
    interrupt = {"next": True}

    def counting_train(model_config, train_config, out, **kwargs):
        calls.append(os.path.basename(out))
        stop, interrupt["next"] = interrupt["next"], False

        def on_step(step, row):
            if stop:
                raise KeyboardInterrupt

        return real_train(model_config, train_config, out, on_step=on_step, **kwargs)

    monkeypatch.setattr(compare_run, "train", counting_train)
    out = tmp_path / "cmp"
    args = ["compare", "--experiments", "h", "--quick", "--seeds", "1", "--jobs", "1", "--out", str(out),
            "--data-dir", str(tmp_path / "cache"), "--gcide-deb", str(synthetic_deb), "--json"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT during run dense-wide-s0" in err and "no results_h.md was written" in err
    assert not (out / "results_h.md").exists()

    calls.clear()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)["h"]
    ran_moe = summary["moe"] is not None
    assert [c.rsplit("-", 1)[0] for c in calls[:2]] == ["dense-wide-s0", "dense-s0"]  # the ceiling first
    assert len(calls) == (3 if ran_moe else 2)
    assert set(summary["models"]) == ({DENSE, WIDE, MOE} if ran_moe else {DENSE, WIDE})
    assert summary["ceiling"]["reached"] == ran_moe
    for row in summary["models"].values():
        assert len(row["heldout_loss"]) == 1 and 0 < row["heldout_loss_mean"] < 10
    assert (out / "results_h.md").exists() and (out / "h_text.png").exists()

    calls.clear()
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)["h"]
    assert calls == []  # every run reused: same corpus, same specs
    assert again["models"][DENSE]["heldout_loss"] == summary["models"][DENSE]["heldout_loss"]
