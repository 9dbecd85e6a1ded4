"""Code and docs cite sources a reader of the repository can follow: docs/ARCHITECTURE.md sections (which must
exist) or primary sources, never the numbered sections of a design note that is not in the repository."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("pixart_jax", "configs", "tests", "bench", "docs", "launch", "scripts", "notebooks", "README.md")
SUFFIXES = {".py", ".md", ".sh", ".ipynb"}
# "spec" followed by a section number or sign: the old citations of the external design note.
FOREIGN = re.compile(r"\bspec" + r"\s+(\d|§|\(section|section)", re.IGNORECASE)
ARCH_CITE = re.compile(r"ARCHITECTURE\.md\s+((?:§\d+(?:\.\d+)?(?:,\s*)?)+)")


def _files():
  for name in SCANNED:
    path = ROOT / name
    paths = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
    yield from (p for p in paths if p.is_file() and p.suffix in SUFFIXES)


def _sections() -> set[str]:
  text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
  return set(re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)?)\.?\s", text, re.MULTILINE))


def test_no_citation_of_a_document_outside_the_repository():
  hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _files()
          for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
          if FOREIGN.search(line)]
  assert not hits, "cite docs/ARCHITECTURE.md sections or primary sources instead:\n" + "\n".join(hits)


def test_every_cited_architecture_section_exists():
  sections = _sections()
  assert {"2.7", "5.7", "6.2"} <= sections  # the parser reads the headings
  missing = []
  for p in _files():
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
      for m in ARCH_CITE.finditer(line):
        missing += [f"{p.relative_to(ROOT)}:{i}: §{s}" for s in re.findall(r"§(\d+(?:\.\d+)?)", m.group(1))
                    if s not in sections]
  assert not missing, "docs/ARCHITECTURE.md has no such section:\n" + "\n".join(missing)
