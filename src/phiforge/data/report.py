"""The per-run prepare report: what was read, kept and removed, and why, as counts plus a few examples.

`OUT/prepare-report.json`:

    {"format": "phiforge-prepare-report", "version": 1,
     "read":    {"units": N, "documents": N, "bytes": N},          # input files/books and records seen
     "kept":    {"documents": N, "tokens": N, "chars": N},
     "removed": {REASON: {"count": N, "chars": N, "examples": ["id or file:line: detail", ...]}, ...},
     "cleaning": {"header_chars": N, "footer_chars": N, "encoding_fallback": {"cp1252": N, ...},
                  "documents_with_markers": N},
     "sources": {SOURCE: {"documents": N, "tokens": N}},
     "timing": {...}}

Reasons are short fixed phrases ("exact duplicate", "near duplicate", "empty file", "malformed json line",
"catalog row with missing fields", ...), so reports of different runs can be compared.
"""

from __future__ import annotations

from collections import Counter, defaultdict

MAX_EXAMPLES = 5
FORMAT = "phiforge-prepare-report"


class Report:
    def __init__(self):
        self.read = Counter()
        self.kept = Counter()
        self.removed: dict[str, dict] = {}
        self.cleaning = Counter()
        self.encodings = Counter()
        self.sources: dict[str, Counter] = defaultdict(Counter)
        self.notes: list[str] = []

    def skip(self, reason: str, example: str = "", chars: int = 0, count: int = 1) -> None:
        r = self.removed.setdefault(reason, {"count": 0, "chars": 0, "examples": []})
        r["count"] += count
        r["chars"] += int(chars)
        if example and len(r["examples"]) < MAX_EXAMPLES:
            r["examples"].append(example[:300])

    def duplicate(self, dup: tuple[str, str, float], doc_id: str, title: str, chars: int, validation: bool) -> None:
        """Count a document removed as a duplicate (dup: Deduper.check's (reason, kept id, similarity))."""
        reason, kept, sim = dup
        near = f" (similarity {sim})" if reason.startswith("near") else ""
        self.skip(reason, f"{doc_id} ({title[:50]}) ~ {kept}{near}", chars)
        if validation:
            self.notes.append(f"validation document {doc_id} was removed as a {reason} of {kept}")

    def add_json(self, rep: dict, note_prefix: str = "") -> None:
        """Add the counts of a report as `to_json` wrote it (the parts' reports, in `data merge`)."""
        self.read.update(rep.get("read", {}))
        self.kept.update(rep.get("kept", {}))
        for reason, r in rep.get("removed", {}).items():
            for example in r.get("examples", []):
                self.skip(reason, example, 0, 0)
            self.removed[reason]["count"] += r.get("count", 0)
            self.removed[reason]["chars"] += r.get("chars", 0)
        cleaning = dict(rep.get("cleaning", {}))
        self.encodings.update(cleaning.pop("encoding_fallback", {}))
        self.cleaning.update(cleaning)
        for src, counts in rep.get("sources", {}).items():
            self.sources[src].update(counts)
        self.notes.extend(note_prefix + n for n in rep.get("notes", []))

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "read": dict(self.read), "kept": dict(self.kept),
                "removed": dict(sorted(self.removed.items(), key=lambda kv: -kv[1]["count"])),
                "cleaning": {**dict(self.cleaning), "encoding_fallback": dict(self.encodings)},
                "sources": {k: dict(v) for k, v in sorted(self.sources.items())},
                "notes": list(self.notes)}

    def state(self) -> dict:
        """Everything the report holds, as JSON (the resume state; `from_state` reads it back)."""
        return {"read": dict(self.read), "kept": dict(self.kept), "removed": self.removed,
                "cleaning": dict(self.cleaning), "encodings": dict(self.encodings),
                "sources": {k: dict(v) for k, v in self.sources.items()}, "notes": list(self.notes)}

    @classmethod
    def from_state(cls, state: dict) -> "Report":
        r = cls()
        for name in ("read", "kept", "cleaning", "encodings"):
            getattr(r, name).update({str(k): int(v) for k, v in state[name].items()})
        r.removed = {str(k): {"count": int(v["count"]), "chars": int(v["chars"]),
                              "examples": [str(x) for x in v["examples"]]} for k, v in state["removed"].items()}
        for src, counts in state["sources"].items():
            r.sources[str(src)].update({str(k): int(v) for k, v in counts.items()})
        r.notes = [str(n) for n in state["notes"]]
        return r

    def summary_lines(self) -> list[str]:
        lines = [f"read {self.read['units']:,} input unit(s), {self.read['documents']:,} document(s); kept "
                 f"{self.kept['documents']:,} ({self.kept['tokens']:,} tokens)"]
        if self.cleaning.get("header_chars") or self.cleaning.get("footer_chars") or self.encodings:
            lines.append(f"cleaning: {self.cleaning.get('header_chars', 0):,} header and "
                         f"{self.cleaning.get('footer_chars', 0):,} footer characters of boilerplate removed"
                         + (f"; encoding fallback {dict(self.encodings)}" if self.encodings else ""))
        for reason, r in sorted(self.removed.items(), key=lambda kv: -kv[1]["count"]):
            ex = f" (e.g. {r['examples'][0]})" if r["examples"] else ""
            lines.append(f"removed {r['count']:,} x {reason}{ex}")
        lines.extend(self.notes)
        return lines
