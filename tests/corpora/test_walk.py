"""walk_folder: which files are documents, and why the others are left out."""

import os
from pathlib import Path

import pytest

from dsarag.base.errors import MissingInputError
from dsarag.corpora.walk import walk_folder


def write(path: Path, data: str | bytes = "some text\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def reasons(result) -> dict[str, str]:
    return {item.path.name: item.reason for item in result.skipped}


def test_documents_and_source_code_are_found_in_sorted_order(tmp_path):
    for name in ["b.md", "a.txt", "sub/c.py", "sub/page.html", "sub/deep/notes.rst", "config.yaml", "README"]:
        write(tmp_path / name)
    result = walk_folder(tmp_path)
    assert result.files == sorted(result.files)
    assert [path.relative_to(tmp_path).as_posix() for path in result.files] == [
        "README",
        "a.txt",
        "b.md",
        "config.yaml",
        "sub/c.py",
        "sub/deep/notes.rst",
        "sub/page.html",
    ]
    assert result.skipped == []


def test_binary_files_are_skipped_with_a_reason(tmp_path):
    write(tmp_path / "notes.txt")
    write(tmp_path / "fake.txt", b"text\x00\x01\x02 with NUL bytes")
    write(tmp_path / "blob.dat", b"\x00\xff" * 100)
    write(tmp_path / "latin.xyz", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(tmp_path / "photo.png", b"\x89PNG\r\n\x1a\n")
    result = walk_folder(tmp_path)
    assert [path.name for path in result.files] == ["notes.txt"]
    why = reasons(result)
    assert "binary" in why["fake.txt"] and "binary" in why["blob.dat"]
    assert "not UTF-8" in why["latin.xyz"]
    assert "unsupported file type .png" in why["photo.png"]


def test_unknown_extension_that_is_utf8_text_is_kept(tmp_path):
    write(tmp_path / "Makefile", "all:\n\techo héllo\n")
    write(tmp_path / "notes.weird", "plain words\n")
    assert [path.name for path in walk_folder(tmp_path).files] == ["Makefile", "notes.weird"]


def test_hidden_and_tooling_folders_are_skipped_silently(tmp_path):
    write(tmp_path / "doc.md")
    for folder in [".git", ".venv", "node_modules", "__pycache__", ".hidden"]:
        write(tmp_path / folder / "inner.md")
    write(tmp_path / "env" / "pyvenv.cfg", "home = /usr/bin\n")  # a virtualenv under another name
    write(tmp_path / "env" / "lib" / "module.py")
    write(tmp_path / ".secret.md")
    result = walk_folder(tmp_path)
    assert [path.name for path in result.files] == ["doc.md"]
    assert result.skipped == []


def test_files_over_the_size_cap_are_skipped_with_a_reason(tmp_path):
    write(tmp_path / "small.txt", "x" * 100)
    write(tmp_path / "big.txt", "x" * 5000)
    result = walk_folder(tmp_path, max_file_bytes=1000)
    assert [path.name for path in result.files] == ["small.txt"]
    assert "size cap" in reasons(result)["big.txt"]


def test_pdf_without_pdf_header_is_skipped(tmp_path):
    write(tmp_path / "real.pdf", b"%PDF-1.4\n\x00\x01binary body")
    write(tmp_path / "fake.pdf", "just text")
    result = walk_folder(tmp_path)
    assert [path.name for path in result.files] == ["real.pdf"]
    assert "no %PDF header" in reasons(result)["fake.pdf"]


def test_symlink_out_of_the_root_is_never_followed(tmp_path):
    root = tmp_path / "docs"
    write(root / "inside.md")
    outside = tmp_path / "private"
    write(outside / "secret.md", "password")
    write(tmp_path / "secret.txt", "password")
    os.symlink(outside, root / "linked_dir")
    os.symlink(tmp_path / "secret.txt", root / "linked_file.txt")
    for follow in (False, True):
        result = walk_folder(root, follow_symlinks=follow)
        assert [path.name for path in result.files] == ["inside.md"]
        assert all(path.resolve().is_relative_to(root.resolve()) for path in result.files)
        why = reasons(result)
        assert set(why) == {"linked_dir", "linked_file.txt"}
    assert "outside the folder" in why["linked_dir"] and "outside the folder" in why["linked_file.txt"]


def test_symlink_loops_terminate_and_links_inside_do_not_duplicate_files(tmp_path):
    write(tmp_path / "a" / "doc.md")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # points back at the root
    os.symlink(tmp_path / "a" / "doc.md", tmp_path / "alias.md")
    os.symlink(tmp_path / "self", tmp_path / "self")  # a link to itself
    result = walk_folder(tmp_path, follow_symlinks=True)
    assert result.files == [tmp_path / "a" / "doc.md"]
    assert "loop" in reasons(result)["self"]


def test_symlinks_are_skipped_with_a_reason_by_default(tmp_path):
    write(tmp_path / "doc.md")
    os.symlink(tmp_path / "doc.md", tmp_path / "alias.md")
    result = walk_folder(tmp_path)
    assert [path.name for path in result.files] == ["doc.md"]
    assert "symbolic link" in reasons(result)["alias.md"]


def test_missing_root_raises_missing_input_error_naming_it(tmp_path):
    with pytest.raises(MissingInputError, match="nowhere: folder not found"):
        walk_folder(tmp_path / "nowhere")


def test_root_that_is_a_file_is_walked_as_that_one_file(tmp_path):
    doc = write(tmp_path / "single.md")
    assert walk_folder(doc).files == [doc]
    binary = write(tmp_path / "blob.txt", b"\x00\x00")
    result = walk_folder(binary)
    assert result.files == [] and "binary" in result.skipped[0].reason


def test_fifo_is_skipped_without_blocking(tmp_path):
    write(tmp_path / "doc.md")
    os.mkfifo(tmp_path / "pipe.txt")
    result = walk_folder(tmp_path)
    assert [path.name for path in result.files] == ["doc.md"]
    assert "not a regular file" in reasons(result)["pipe.txt"]
