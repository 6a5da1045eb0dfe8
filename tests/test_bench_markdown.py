"""bench/common.py: a script rewrites only its own marked block of a Markdown file (BENCHMARKS.md)."""

import pytest

from bench.common import block_markers, replace_marked_block, write_marked_block

BEFORE = "# Benchmarks\n\nHand-written intro, kept as is.  \n\n"
AFTER = "\n\n## (i) Written by hand\n\nTrailing text without a final newline"
GPU = "<!-- bench_gpu.py: begin -->\n## GPU\n\nold GPU figures\n<!-- bench_gpu.py: end -->\n"


def test_markers_are_html_comments_named_after_the_script():
    assert block_markers("bench.py") == ("<!-- bench.py: begin -->", "<!-- bench.py: end -->")


def test_replaces_the_block_and_keeps_the_rest_byte_for_byte():
    text = BEFORE + "<!-- bench.py: begin -->\nold\nfigures\n<!-- bench.py: end -->" + AFTER
    out = replace_marked_block(text, "bench.py", "## Setup\n\nnew figures\n")
    assert out == BEFORE + "<!-- bench.py: begin -->\n## Setup\n\nnew figures\n<!-- bench.py: end -->" + AFTER
    # A second run with the same block changes nothing; a block without a final newline gets one.
    assert replace_marked_block(out, "bench.py", "## Setup\n\nnew figures\n") == out
    assert replace_marked_block(out, "bench.py", "## Setup\n\nnew figures") == out


def test_leaves_another_scripts_block_alone():
    text = BEFORE + "<!-- bench.py: begin -->\nold\n<!-- bench.py: end -->\n\n" + GPU + AFTER
    out = replace_marked_block(text, "bench.py", "new\n")
    assert out == BEFORE + "<!-- bench.py: begin -->\nnew\n<!-- bench.py: end -->\n\n" + GPU + AFTER
    out_gpu = replace_marked_block(out, "bench_gpu.py", "## GPU\n\nnew GPU figures\n")
    assert out_gpu == out.replace("old GPU figures", "new GPU figures")


@pytest.mark.parametrize(("text", "sep"), [
    ("# Benchmarks\n\nHand-written.\n", "\n"),  # one blank line between the text and the block
    ("# Benchmarks\n\nHand-written.\n\n", ""),  # already there
    ("# Benchmarks\n\nHand-written.", "\n\n"),  # no final newline
    ("", ""),  # empty file: the block alone
])
def test_appends_the_block_when_the_text_has_no_markers(text, sep):
    out = replace_marked_block(text, "bench.py", "## Setup\n")
    assert out == text + sep + "<!-- bench.py: begin -->\n## Setup\n<!-- bench.py: end -->\n"
    # Appended once: the next run replaces it.
    assert replace_marked_block(out, "bench.py", "## Later\n") == out.replace("## Setup", "## Later")


@pytest.mark.parametrize("text", [
    "<!-- bench.py: begin -->\nno end\n",
    "no begin\n<!-- bench.py: end -->\n",
    "<!-- bench.py: end -->\nwrong order\n<!-- bench.py: begin -->\n",
    "<!-- bench.py: begin -->\na\n<!-- bench.py: end -->\n<!-- bench.py: begin -->\nb\n<!-- bench.py: end -->\n",
])
def test_malformed_markers_are_an_error_not_a_guess(text):
    with pytest.raises(ValueError, match="bench.py: begin"):
        replace_marked_block(text, "bench.py", "new\n")


def test_write_marked_block_creates_the_file_with_its_header_then_replaces(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_marked_block(path, "bench.py", "first\n", new_file_header="# Benchmarks\n")
    assert path.read_bytes() == b"# Benchmarks\n\n<!-- bench.py: begin -->\nfirst\n<!-- bench.py: end -->\n"
    path.write_bytes(path.read_bytes() + b"\n## Hand-written\n\nkept\n")
    write_marked_block(path, "bench.py", "second\n", new_file_header="# ignored for an existing file\n")
    assert path.read_bytes() == (b"# Benchmarks\n\n<!-- bench.py: begin -->\nsecond\n<!-- bench.py: end -->\n"
                                 b"\n## Hand-written\n\nkept\n")
