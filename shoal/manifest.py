"""Manifests: Kubernetes-style YAML in, validated `DeploymentSpec` / `ServiceSpec` out.

This is the only module that knows the YAML shape; everything else works on the values
of `shoal.model`.

Rules
-----
- Supported: `apps/v1 Deployment` and `v1 Service`, with the fields real users write
  (each `_Checker` method lists the keys it accepts). A field shoal does not support is
  an error naming its path (`spec.template.spec.containers[0].volumeMounts: field not supported by
  shoal`), never silently ignored. A top-level `status:` (kubectl exports) is ignored
  and dropped from `raw`.
- Every problem is reported at once, as `ManifestProblem(source, line, path, message)`,
  sorted by source then line. The line is the one holding the offending key or value.
- One clear line, and nothing more for that file or document, for: input larger than
  `MAX_DOCUMENT_BYTES` (not parsed at all), input that is not YAML, no documents, a
  document that is not a mapping, an unsupported kind or apiVersion. Empty documents
  between `---` are skipped. Duplicate keys are errors. Two documents with the same kind
  and name in one apply are an error.
- Types are Kubernetes': integers must be YAML integers (`"80"` is a string), strings
  must be strings (label values and env values included: quote `"8080"`, `"yes"`), CPU
  and memory are Kubernetes quantities (`500m`, `0.5`, `64Mi`, `128M`, `1e3`). A null
  value means the field is absent.
- shoal's knobs are annotations: `shoal.io/balance`, `shoal.io/dataplane`,
  `shoal.io/protocol` and `shoal.io/hash-header` (Service),
  `shoal.io/driver` (Deployment or its template), `shoal.io/placement` (Deployment),
  `shoal.io/weight` (template: a positive integer). Any other `shoal.io/` key is an
  error. `shoal.io/dataplane: kernel` takes only the algorithms nftables can pick with
  (`round_robin`, `random`); any other is an error, not a silent downgrade.
- A service port's proxy mode is its `appProtocol` (`tcp` or `http`), else the Service's
  `shoal.io/protocol`, else `tcp`. The kernel data plane cannot parse HTTP, so `http`
  with `shoal.io/dataplane: kernel` is an error. `shoal.io/hash-header` (an HTTP header
  name) needs `consistent_hash` and at least one `http` port, or it would do nothing.
- One container per replica. With `shoal.io/driver: process` the image is optional and
  `command` is required; with docker (the default) the image is required.
- Label-like maps (labels, selectors, annotations, nodeSelector) are sorted by key in
  the specs, so a spec does not depend on key order; env and ports keep their order.
- `DeploymentSpec.annotations` is the Deployment's annotations plus the template's
  `shoal.io/` ones, so every knob is read from one place; `template_annotations` is the
  template's map as written.

How it works
------------
`parse_text` composes the YAML with PyYAML's `SafeLoader` into nodes (never
constructing arbitrary objects) and converts them to plain values itself, recording the
line of every field path and rejecting duplicate keys, unknown tags and runaway alias
expansion on the way. The plain value of each document (minus `status`) is its `raw`:
JSON-compatible, what the server stores. Validation then runs on plain values only,
which is why `parse_raw(document.raw)` rebuilds exactly the same spec.

The pure-Python loader is used on purpose: libyaml's C composer crashes the process on
deeply nested input. Ours refuses nesting deeper than `_MAX_DEPTH` while scanning (the
scanner is quadratic in flow depth) and expands aliases under a budget, so no input
under the size limit can hang or crash it. The price is speed: about 5 s for a full
megabyte, milliseconds for a real manifest.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from shoal import model
from shoal.errors import ManifestError, ManifestProblem

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "Document",
    "parse_text",
    "load_paths",
    "parse_raw",
    "parse_cpu",
    "parse_memory",
]

# A manifest file is kilobytes; a megabyte is already thousands of objects. The cap keeps
# a mistaken `apply -f big.log` (or a hostile client) from tying up the parser.
MAX_DOCUMENT_BYTES = 1024 * 1024

# YAML aliases let a few bytes expand into billions of values ("billion laughs"); no
# manifest comes near these bounds, so anything beyond them is refused, not expanded.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1

_Path = tuple[str | int, ...]

_STORED = "<stored>"

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG_PREFIX + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = (_TAG_PREFIX + t for t in ("map", "seq", "merge"))
# Scalars kept as their text: a timestamp means nothing to a manifest, and `=` is a
# YAML 1.1 oddity that is just a string to every Kubernetes tool.
_TEXT_TAGS = frozenset({_TAG_PREFIX + "timestamp", _TAG_PREFIX + "value"})

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
# IANA service name, as Kubernetes checks port names.
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")
_PERCENT = re.compile(r"[0-9]+%")
_POSITIVE_DECIMAL = re.compile(r"[0-9]+")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token

# Docker's reference grammar (distribution/reference), without IPv6 registry hosts.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)

_QUANTITY = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(Ki|Mi|Gi|Ti|Pi|Ei)|[eE]([+-]?[0-9]+)|(n|u|m|k|M|G|T|P|E))?"
)
_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIX = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_MAX_QUANTITY_CHARS = 64
_MAX_EXPONENT = 30  # 1e30 bytes or cores is already absurd; bounds the arithmetic
_BYTES_TYPO = re.compile(r"([0-9.]+)([KMGTPE])i?B")

_SHOAL_PREFIX = "shoal.io/"
_KNOWN_ANNOTATIONS = (
    model.ANNOTATION_BALANCE,
    model.ANNOTATION_DATAPLANE,
    model.ANNOTATION_DRIVER,
    model.ANNOTATION_HASH_HEADER,
    model.ANNOTATION_PLACEMENT,
    model.ANNOTATION_PROTOCOL,
    model.ANNOTATION_WEIGHT,
)

_API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1"}
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
_STRATEGIES = ("RollingUpdate", "Recreate")
_PROBE_HANDLERS = {
    "httpGet": model.ProbeKind.HTTP,
    "tcpSocket": model.ProbeKind.TCP,
    "exec": model.ProbeKind.EXEC,
    "grpc": model.ProbeKind.GRPC,
}
_PROBE_TIMINGS = (
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """One parsed YAML document: where it came from, its raw form and its spec."""

    source: str  # file name as the user gave it, or "<stdin>"
    line: int  # 1-based line where the document starts
    kind: str
    name: str
    raw: dict[str, Any]  # plain JSON-compatible dict, `status` dropped; what the server stores
    spec: model.DeploymentSpec | model.ServiceSpec


# --------------------------------------------------------------------------- public API


def parse_text(text: str | bytes, source: str) -> list[Document]:
    """Parse one multi-document YAML text; raise `ManifestError` with every problem."""
    problems: list[ManifestProblem] = []
    parsed = _parse_source(text, source, problems)
    _check_unique(parsed, problems)
    _raise_if(problems)
    return [doc for doc, _ in parsed]


def load_paths(paths: list[str], stdin: IO[Any] | None = None) -> list[Document]:
    """Parse files, directories (their *.yaml, *.yml, *.json, sorted, not recursive) and
    "-" (stdin) as one apply; raise `ManifestError` with every problem in every file."""
    problems: list[ManifestProblem] = []
    inputs: list[tuple[str, str | bytes]] = []
    if not paths:
        problems.append(_problem("-f", None, "", "no manifest file given"))
    stdin_read = False
    for path in paths:
        if path == "-":
            if stdin_read:
                problems.append(_problem("<stdin>", None, "", 'given more than once ("-")'))
                continue
            stdin_read = True
            # Bytes where there are any: the size limit is in bytes, and YAML finds the encoding.
            stream = stdin if stdin is not None else sys.stdin
            stream = getattr(stream, "buffer", stream)
            inputs.append(("<stdin>", stream.read(MAX_DOCUMENT_BYTES + 1)))
        elif os.path.isdir(path):
            try:
                names = sorted(
                    n
                    for n in os.listdir(path)
                    if n.endswith((".yaml", ".yml", ".json"))
                    and os.path.isfile(os.path.join(path, n))
                )
            except OSError as e:
                problems.append(_problem(path, None, "", _os_message(e)))
                continue
            if not names:
                problems.append(_problem(path, None, "", "no .yaml, .yml or .json files in this directory"))
            for name in names:
                _read_file(os.path.join(path, name), inputs, problems)
        else:
            _read_file(path, inputs, problems)
    parsed: list[tuple[Document, int | None]] = []
    for source, data in inputs:
        parsed.extend(_parse_source(data, source, problems))
    _check_unique(parsed, problems)
    _raise_if(problems)
    return [doc for doc, _ in parsed]


def parse_raw(raw: dict[str, Any], source: str = _STORED) -> model.DeploymentSpec | model.ServiceSpec:
    """Rebuild the spec from a stored `Document.raw` (no line numbers to report)."""
    problems: list[ManifestProblem] = []
    built = _Checker(source, _Plain(value=raw), problems).document(raw)
    _raise_if(problems)
    assert built is not None  # no problems means a spec was built
    return built[2]


def parse_cpu(value: object) -> int:
    """A Kubernetes CPU quantity (`500m`, `0.5`, `2`) in millicores, rounded up.

    Raises ValueError with a message fit for a user."""
    q = _quantity(value, "a CPU quantity such as 500m, 0.5 or 2")
    millis = math.ceil(q * 1000)
    if millis > _INT64_MAX:
        raise ValueError(f"is too large, got {_show(value)}")
    return millis


def parse_memory(value: object) -> int:
    """A Kubernetes memory quantity (`64Mi`, `1Gi`, `128M`, `1e3`, `1000`) in bytes.

    Raises ValueError with a message fit for a user."""
    q = _quantity(value, "a memory quantity such as 64Mi, 1Gi, 128M or 1e3")
    if q.denominator != 1:
        hint = ""
        if isinstance(value, str) and value.endswith("m"):
            hint = f' ("m" means thousandths; did you mean "{value[:-1]}Mi"?)'
        raise ValueError(f"must be a whole number of bytes, got {_show(value)}{hint}")
    if q > _INT64_MAX:
        raise ValueError(f"is too large, got {_show(value)}")
    return int(q)


# ------------------------------------------------------------------------- orchestration


def _problem(source: str, line: int | None, path: str, message: str) -> ManifestProblem:
    return ManifestProblem(source=source, line=line, path=path, message=message)


def _raise_if(problems: list[ManifestProblem]) -> None:
    if problems:
        # Stable: problems on one line stay in the order they were found.
        raise ManifestError(sorted(problems, key=lambda p: (p.source, p.line or 0)))


def _os_message(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _read_file(path: str, inputs: list[tuple[str, str | bytes]], problems: list[ManifestProblem]) -> None:
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit: enough to know it is too big, never more.
            inputs.append((path, f.read(MAX_DOCUMENT_BYTES + 1)))
    except OSError as e:
        problems.append(_problem(path, None, "", _os_message(e)))


def _too_big(text: str | bytes) -> bool:
    if len(text) > MAX_DOCUMENT_BYTES:
        return True
    return isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES


def _parse_source(
    text: str | bytes, source: str, problems: list[ManifestProblem]
) -> list[tuple[Document, int | None]]:
    """Parse one file or stream; append its problems; return its good documents, each
    with the line of its name."""
    if _too_big(text):
        problems.append(
            _problem(
                source,
                None,
                "",
                f"larger than the {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB limit "
                f"({MAX_DOCUMENT_BYTES} bytes) for one file; split it into several files",
            )
        )
        return []
    text = _untab_json(text)
    try:
        roots = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        problems.append(_problem(source, line, "", f"not valid YAML: {e.problem}"))
        return []
    except yaml.reader.ReaderError as e:
        problems.append(
            _problem(source, _line_at(text, e.position), "", f"not valid YAML: {e.reason}: 0x{e.character:02x}")
        )
        return []
    except yaml.YAMLError as e:
        problems.append(_problem(source, None, "", f"not valid YAML: {e}"))
        return []

    converter = _Converter(source, problems)
    documents: list[tuple[Document, int | None]] = []
    seen_any = False
    for root in roots:
        if isinstance(root, ScalarNode) and root.tag == _NULL:
            continue  # an empty document between `---` markers
        seen_any = True
        doc_line = root.start_mark.line + 1
        before = len(problems)
        converted = converter.document(root, doc_line)
        if converted is None:
            continue
        built = _Checker(source, converted, problems).document(converted.value)
        if built is None or len(problems) > before:
            continue
        kind, name, spec = built
        raw = {k: v for k, v in converted.value.items() if k != "status"}
        document = Document(source=source, line=doc_line, kind=kind, name=name, raw=raw, spec=spec)
        documents.append((document, converted.lines.get(("metadata", "name"), doc_line)))
    if not seen_any:
        problems.append(_problem(source, None, "", "no documents (the input is empty or only comments)"))
    return documents


def _untab_json(text: str | bytes) -> str | bytes:
    """JSON may be indented with tabs, which YAML forbids. Valid JSON has no raw tab inside
    a string, so swapping tabs for spaces changes nothing else (columns included)."""
    tab: str | bytes = "\t" if isinstance(text, str) else b"\t"
    if tab not in text:  # type: ignore[operator]
        return text
    head = text.lstrip()[:1]
    if head not in ("{", "[", b"{", b"["):
        return text
    try:
        json.loads(text)
    except ValueError:
        return text
    return text.replace(tab, " " if isinstance(text, str) else b" ")  # type: ignore[arg-type]


def _line_at(text: str | bytes, position: int) -> int:
    newline: str | bytes = "\n" if isinstance(text, str) else b"\n"
    return text[:position].count(newline) + 1  # type: ignore[arg-type]


def _check_unique(parsed: list[tuple[Document, int | None]], problems: list[ManifestProblem]) -> None:
    first: dict[tuple[str, str], tuple[str, int | None]] = {}
    for doc, name_line in parsed:
        key = (doc.kind, doc.name)
        if key in first:
            source, line = first[key]
            problems.append(
                _problem(
                    doc.source,
                    name_line,
                    "metadata.name",
                    f'{doc.kind} "{doc.name}" is also defined at {source}:{line}',
                )
            )
        else:
            first[key] = (doc.source, name_line)


# ---------------------------------------------------------------------- YAML to plain


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing deep nesting while scanning.

    The scanner's simple-key bookkeeping is quadratic in the flow nesting level, so a
    megabyte of `[` would take hours, and the composer recurses once per level; no
    manifest nests anywhere near `_MAX_DEPTH`."""

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 (PyYAML's name)
        if self.flow_level >= _MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                problem=f"nested more than {_MAX_DEPTH} levels deep", problem_mark=self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= _MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                problem=f"nested more than {_MAX_DEPTH} levels deep", problem_mark=self.get_mark()
            )
        return bool(super().add_indent(column))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plain:
    """One document as plain values, with what is needed to report problems in it."""

    value: Any
    line: int | None = None  # where the document starts
    lines: Mapping[_Path, int] = field(default_factory=dict)  # the line of each field path
    texts: Mapping[_Path, str] = field(default_factory=dict)  # non-string scalars as written
    broken: frozenset[_Path] = frozenset()  # paths whose YAML is already reported as bad


class _Refused(Exception):
    """The document cannot be converted at all; the message says why."""


class _Converter:
    """Turns composed YAML nodes into plain values, recording the line of every path.

    The line of a path is its value's line for a scalar and its key's line for a mapping
    or list (so `containers: must list ...` points at `containers:`); list items use the
    line where the item starts."""

    def __init__(self, source: str, problems: list[ManifestProblem]) -> None:
        self._source = source
        self._problems = problems
        self._constructor = SafeConstructor()
        self._budget = _MAX_VALUES  # per file: aliases cannot multiply across documents
        self._lines: dict[_Path, int] = {}
        self._texts: dict[_Path, str] = {}
        self._broken: set[_Path] = set()

    def document(self, root: Node, line: int) -> _Plain | None:
        self._lines = {}
        self._texts = {}
        self._broken = set()
        try:
            value = self._convert(root, (), 0, None)
        except _Refused as e:
            self._problems.append(_problem(self._source, root.start_mark.line + 1, "", str(e)))
            return None
        return _Plain(value=value, line=line, lines=self._lines, texts=self._texts, broken=frozenset(self._broken))

    def _error(self, path: _Path, line: int, message: str) -> None:
        self._broken.add(path)
        self._problems.append(_problem(self._source, line, _format_path(path), message))

    def _convert(self, node: Node, path: _Path, depth: int, key_line: int | None) -> Any:
        self._budget -= 1
        if self._budget < 0:
            raise _Refused(f"more than {_MAX_VALUES} values once YAML aliases are expanded")
        if depth > _MAX_DEPTH:
            raise _Refused(f"nested more than {_MAX_DEPTH} levels deep")
        line = node.start_mark.line + 1
        if isinstance(node, ScalarNode):
            self._lines[path] = line
            return self._scalar(node, path, line)
        self._lines[path] = key_line if key_line is not None else line
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self._error(path, line, f"YAML tag {_short_tag(node.tag)} is not supported")
                return None
            return [self._convert(item, (*path, i), depth + 1, None) for i, item in enumerate(node.value)]
        assert isinstance(node, MappingNode)
        if node.tag != _MAP:
            self._error(path, line, f"YAML tag {_short_tag(node.tag)} is not supported")
            return None
        return self._mapping(node, path, depth)

    def _scalar(self, node: ScalarNode, path: _Path, line: int) -> Any:
        tag = node.tag
        if tag == _STR or tag in _TEXT_TAGS:
            return node.value
        if tag not in (_INT, _FLOAT, _BOOL, _NULL):
            self._error(path, line, f"YAML tag {_short_tag(tag)} is not supported")
            return None
        self._texts[path] = node.value
        try:
            value = {
                _INT: self._constructor.construct_yaml_int,
                _FLOAT: self._constructor.construct_yaml_float,
                _BOOL: self._constructor.construct_yaml_bool,
                _NULL: self._constructor.construct_yaml_null,
            }[tag](node)
        except (ValueError, KeyError, ConstructorError):
            # e.g. `!!int abc`, or an integer too long for Python to read
            self._error(path, line, f"not a valid {_short_tag(tag)}: {_show(node.value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            # JSON (what the server stores) has no infinities; no field wants one.
            self._error(path, line, f"must be a finite number, got {node.value}")
            return None
        return value

    def _mapping(self, node: MappingNode, path: _Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # Merge keys (`<<: *base`) first, the last map first: as YAML says, explicit keys
        # then earlier maps override them, and the lines recorded are overridden alike.
        own_line = self._lines[path]
        for source in reversed(self._merge_sources(node, path)):
            value = self._convert(source, path, depth + 1, None)
            if isinstance(value, dict):
                out.update(value)
        self._lines[path] = own_line
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, ScalarNode):
                self._error(path, key_line, "mapping keys must be plain strings")
                continue
            key = key_node.value  # the key's text: `on:` is "on", `1:` is "1"
            if key in key_lines:
                self._error((*path, key), key_line, f"duplicate key (first at line {key_lines[key]})")
                continue
            key_lines[key] = key_line
            out[key] = self._convert(value_node, (*path, key), depth + 1, key_line)
        return out

    def _merge_sources(self, node: MappingNode, path: _Path) -> list[MappingNode]:
        sources: list[MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            for source in value_node.value if isinstance(value_node, SequenceNode) else [value_node]:
                if isinstance(source, MappingNode):
                    sources.append(source)
                else:
                    line = source.start_mark.line + 1
                    self._error((*path, "<<"), line, "must be a mapping or a list of mappings")
        return sources


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG_PREFIX) :] if tag.startswith(_TAG_PREFIX) else tag


def _format_path(path: _Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _FIELD.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _show(value: object) -> str:
    """A value as a user wrote it, for `got ...` in messages."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


# --------------------------------------------------------------------------- quantities


def _quantity(value: object, what: str) -> Fraction:
    """A Kubernetes quantity as an exact fraction; ValueError with the user's message."""
    q: Fraction
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be {what}, got {_show(value)}")
    if isinstance(value, int):
        q = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be {what}, got {_show(value)}")
        q = Fraction(repr(value))  # 0.1 means one tenth, not the nearest binary float
    else:
        m = _QUANTITY.fullmatch(value) if len(value) <= _MAX_QUANTITY_CHARS else None
        if m is None:
            typo = _BYTES_TYPO.fullmatch(value)
            hint = f' (did you mean "{typo[1]}{typo[2]}i"?)' if typo else ""
            raise ValueError(f"must be {what}, got {_show(value)}{hint}")
        number, binary, exponent, decimal = m.groups()
        q = Fraction(number)
        if binary:
            q *= _BINARY_SUFFIX[binary]
        elif exponent:
            if abs(int(exponent)) > _MAX_EXPONENT:
                raise ValueError(f"is out of range, got {_show(value)}")
            q *= Fraction(10) ** int(exponent)
        elif decimal:
            q *= _DECIMAL_SUFFIX[decimal]
    if q < 0:
        raise ValueError(f"must not be negative, got {_show(value)}")
    return q


# ---------------------------------------------------------------------------- checking


class _Checker:
    """Validates one plain document and builds its spec, collecting every problem."""

    def __init__(self, source: str, plain: _Plain, problems: list[ManifestProblem]) -> None:
        self._source = source
        self._plain = plain
        self._problems = problems
        self.errors = 0  # problems found, reported or not: decides whether a spec is built

    # -- reporting

    def error(self, path: _Path, message: str) -> None:
        if any(path[:n] in self._plain.broken for n in range(len(path) + 1)):
            # Already reported as bad YAML (a tag, a duplicate, an infinity); its value is
            # a placeholder, so anything said about it now would be noise.
            self.errors += 1
            return
        self.errors += 1
        self._problems.append(_problem(self._source, self._line(path), _format_path(path), message))

    def _line(self, path: _Path) -> int | None:
        # A missing field is reported at its parent's line.
        while path and path not in self._plain.lines:
            path = path[:-1]
        return self._plain.lines.get(path, self._plain.line)

    def _quote_hint(self, path: _Path, value: object) -> str:
        if isinstance(value, bool | int | float):
            text = self._plain.texts.get(path, _show(value))
            return f" (quote it: {json.dumps(text)})"
        return ""

    # -- typed access

    def mapping(self, path: _Path, value: object, allowed: Collection[str] | None) -> dict[str, Any] | None:
        """A mapping with only `allowed` keys (each other key is a problem; None allows any
        key); None if it is not a mapping. Null is the empty mapping."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_show(value)}")
            return None
        if allowed is None:
            return value
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.8)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error((*path, key), f"field not supported by shoal{hint}")
        return value

    def sub(self, parent: dict[str, Any], path: _Path, key: str, allowed: Collection[str]) -> dict[str, Any] | None:
        return self.mapping((*path, key), parent.get(key), allowed)

    def items(self, path: _Path, value: object) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_show(value)}")
            return None
        return value

    def string(self, parent: dict[str, Any], path: _Path, key: str, *, required: bool = False) -> str | None:
        value = parent.get(key)
        p = (*path, key)
        if value is None:
            if required:
                self.error(p, "required")
            return None
        if not isinstance(value, str):
            self.error(p, f"must be a string, got {_show(value)}{self._quote_hint(p, value)}")
            return None
        return value

    def integer(
        self,
        parent: dict[str, Any],
        path: _Path,
        key: str,
        low: int,
        high: int = _INT32_MAX,
        *,
        required: bool = False,
    ) -> int | None:
        p = (*path, key)
        value = parent.get(key)
        if value is None:
            if required:
                self.error(p, "required")
            return None
        return self.integer_value(p, value, low, high)

    def integer_value(self, path: _Path, value: object, low: int, high: int = _INT32_MAX) -> int | None:
        if _is_int(value) and low <= value <= high:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        if high != _INT32_MAX:
            self.error(path, f"must be an integer between {low} and {high}, got {_show(value)}")
        elif _is_int(value) and value > high:  # type: ignore[operator]
            self.error(path, f"must be at most {high}, got {_show(value)}")
        else:
            self.error(path, f"must be an integer >= {low}, got {_show(value)}")
        return None

    def strings(self, parent: dict[str, Any], path: _Path, key: str) -> tuple[str, ...] | None:
        p = (*path, key)
        values = self.items(p, parent.get(key))
        if values is None:
            return None
        ok = True
        for i, v in enumerate(values):
            if not isinstance(v, str):
                self.error((*p, i), f"must be a string, got {_show(v)}{self._quote_hint((*p, i), v)}")
                ok = False
        return tuple(values) if ok else None

    def choice(self, path: _Path, value: object, choices: Collection[str]) -> str | None:
        if isinstance(value, str) and value in choices:
            return value
        self.error(path, f"must be one of {', '.join(choices)}, got {_show(value)}")
        return None

    def dns_label(self, path: _Path, value: object) -> str | None:
        if isinstance(value, str) and len(value) <= 63 and _DNS_LABEL.fullmatch(value):
            return value
        self.error(
            path,
            "must be a DNS-1123 label (at most 63 lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit), got {_show(value)}",
        )
        return None

    def port_name(self, path: _Path, value: object) -> str | None:
        if _is_port_name(value):
            return value  # type: ignore[return-value]
        self.error(
            path,
            "must be a port name (at most 15 lowercase letters, digits and '-', "
            f"with at least one letter), got {_show(value)}",
        )
        return None

    # -- maps of strings

    def _key(self, path: _Path, key: str, what: str) -> bool:
        prefix, slash, name = key.rpartition("/")
        ok = (
            0 < len(name) <= 63
            and _QUALIFIED_NAME.fullmatch(name) is not None
            and (not slash or (0 < len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix) is not None))
        )
        if not ok:
            self.error(
                path,
                f"{what} key must be a name of at most 63 letters, digits, '-', '_' or '.' "
                f"(starting and ending with a letter or digit), optionally after a DNS prefix "
                f"and '/', got {_show(key)}",
            )
        return ok

    def labels(self, path: _Path, value: object, *, what: str = "label") -> tuple[tuple[str, str], ...] | None:
        """A label map (labels, selectors, nodeSelector), sorted by key."""
        m = self.mapping(path, value, None)
        if m is None:
            return None
        ok = True
        for k, v in m.items():
            p = (*path, k)
            ok = self._key(p, k, what) and ok
            if not isinstance(v, str):
                self.error(p, f"must be a string, got {_show(v)}{self._quote_hint(p, v)}")
                ok = False
            elif len(v) > 63 or not _LABEL_VALUE.fullmatch(v):
                self.error(
                    p,
                    f"{what} value must be at most 63 letters, digits, '-', '_' or '.', "
                    f"starting and ending with a letter or digit, got {_show(v)}",
                )
                ok = False
        return tuple(sorted(m.items())) if ok else None

    def annotations(
        self, path: _Path, value: object, handlers: Mapping[str, Callable[[_Path, str], object]]
    ) -> tuple[tuple[str, str], ...] | None:
        """An annotation map, sorted by key; `shoal.io/` keys go to `handlers` (a known key
        without a handler is misplaced, an unknown one is an error)."""
        m = self.mapping(path, value, None)
        if m is None:
            return None
        ok = True
        for k, v in m.items():
            p = (*path, k)
            if not self._key(p, k, "annotation"):
                ok = False
                continue
            if not isinstance(v, str):
                self.error(p, f"must be a string, got {_show(v)}{self._quote_hint(p, v)}")
                ok = False
                continue
            if k.startswith(_SHOAL_PREFIX):
                if k in handlers:
                    ok = handlers[k](p, v) is not None and ok
                elif k in _KNOWN_ANNOTATIONS:
                    self.error(p, _MISPLACED[k])
                    ok = False
                else:
                    self.error(p, f"unknown shoal annotation (known: {', '.join(_KNOWN_ANNOTATIONS)})")
                    ok = False
        return tuple(sorted(m.items())) if ok else None

    # -- documents

    def document(self, doc: object) -> tuple[str, str, model.DeploymentSpec | model.ServiceSpec] | None:
        """Check one document; return (kind, name, spec), or None after reporting."""
        if not isinstance(doc, dict):
            self.error(
                (),
                "a manifest document must be a mapping with apiVersion, kind, metadata and spec, "
                f"got {_show(doc) if isinstance(doc, list | dict) else 'a single value ' + _show(doc)}",
            )
            return None
        kind = doc.get("kind")
        if kind is None:
            self.error(("kind",), "required (Deployment or Service)")
            return None
        if not isinstance(kind, str) or kind not in _API_VERSIONS:
            self.error(("kind",), f"must be Deployment or Service, got {_show(kind)}")
            return None
        api_version = doc.get("apiVersion")
        if api_version is None:
            self.error(("apiVersion",), f"required: {_API_VERSIONS[kind]} for a {kind}")
            return None
        if api_version != _API_VERSIONS[kind]:
            self.error(("apiVersion",), f"must be {_API_VERSIONS[kind]} for a {kind}, got {_show(api_version)}")
            return None
        before = self.errors
        self.mapping((), doc, ("apiVersion", "kind", "metadata", "spec", "status"))
        spec: model.DeploymentSpec | model.ServiceSpec | None
        if kind == "Deployment":
            name, spec = self.deployment(doc)
        else:
            name, spec = self.service(doc)
        if self.errors > before:
            return None
        assert spec is not None and name is not None, "a spec was refused without a problem"
        return kind, name, spec

    def metadata(
        self, doc: dict[str, Any], handlers: Mapping[str, Callable[[_Path, str], object]]
    ) -> tuple[str | None, tuple[tuple[str, str], ...] | None, tuple[tuple[str, str], ...] | None]:
        path: _Path = ("metadata",)
        meta = self.sub(doc, (), "metadata", ("name", "namespace", "labels", "annotations"))
        if meta is None:
            return None, None, None
        name = self.string(meta, path, "name", required=True)
        if name is not None:
            name = self.dns_label((*path, "name"), name)
        namespace = self.string(meta, path, "namespace")
        if namespace is not None and namespace != "default":
            self.error(
                (*path, "namespace"),
                f'must be "default" (shoal has one namespace), got {_show(namespace)}',
            )
        labels = self.labels((*path, "labels"), meta.get("labels"))
        annotations = self.annotations((*path, "annotations"), meta.get("annotations"), handlers)
        return name, labels, annotations

    def deployment(self, doc: dict[str, Any]) -> tuple[str | None, model.DeploymentSpec | None]:
        before = self.errors
        found: dict[str, model.Driver | model.Placement] = {}
        where: dict[str, _Path] = {}

        def enum_handler(
            key: str, enum: type[model.Driver] | type[model.Placement]
        ) -> Callable[[_Path, str], object]:
            def handle(path: _Path, value: str) -> object:
                choice = self.choice(path, value, [e.value for e in enum])
                if choice is None:
                    return None
                if key in found and found[key] != enum(choice):
                    self.error(
                        path,
                        f"{_show(value)} contradicts {_format_path(where[key])} "
                        f"({_show(found[key].value)})",
                    )
                    return None
                found[key] = enum(choice)
                where[key] = path
                return choice

            return handle

        driver_handler = enum_handler("driver", model.Driver)
        name, labels, annotations = self.metadata(
            doc,
            {
                model.ANNOTATION_DRIVER: driver_handler,
                model.ANNOTATION_PLACEMENT: enum_handler("placement", model.Placement),
            },
        )

        path: _Path = ("spec",)
        if doc.get("spec") is None:
            self.error(path, "required")
            return name, None
        spec = self.sub(
            doc,
            (),
            "spec",
            (
                "replicas",
                "selector",
                "template",
                "strategy",
                "revisionHistoryLimit",
                "minReadySeconds",
                "progressDeadlineSeconds",
            ),
        )
        if spec is None:
            return name, None
        replicas = self.integer(spec, path, "replicas", 0)
        history = self.integer(spec, path, "revisionHistoryLimit", 0)
        min_ready = self.integer(spec, path, "minReadySeconds", 0)
        deadline = self.integer(spec, path, "progressDeadlineSeconds", 1)
        if min_ready is not None and min_ready >= (deadline or 600):
            at = "progressDeadlineSeconds" if deadline is not None else "minReadySeconds"
            self.error((*path, at), "progressDeadlineSeconds (default 600) must be greater than minReadySeconds")

        selector = self.sub(spec, path, "selector", ("matchLabels",))
        match_labels = None
        if selector is not None and "matchExpressions" not in selector:  # already reported
            if not selector.get("matchLabels"):
                self.error(
                    (*path, "selector", "matchLabels"),
                    "required: the labels that pick this deployment's replicas",
                )
            else:
                match_labels = self.labels((*path, "selector", "matchLabels"), selector["matchLabels"])

        template_labels = template_annotations = None
        driver = model.Driver.DOCKER
        container = node_selector = None
        tpath: _Path = (*path, "template")
        template = self.sub(spec, path, "template", ("metadata", "spec"))
        if template is not None and not template:
            self.error(tpath, "required: the replicas' labels (metadata.labels) and container (spec.containers)")
        elif template is not None:
            mpath: _Path = (*tpath, "metadata")
            tmeta = self.sub(template, tpath, "metadata", ("labels", "annotations"))
            if tmeta is not None:
                if not tmeta.get("labels"):
                    self.error((*mpath, "labels"), "required: the labels spec.selector.matchLabels picks")
                else:
                    template_labels = self.labels((*mpath, "labels"), tmeta["labels"])
                template_annotations = self.annotations(
                    (*mpath, "annotations"),
                    tmeta.get("annotations"),
                    {model.ANNOTATION_DRIVER: driver_handler, model.ANNOTATION_WEIGHT: self.weight},
                )
            # The driver decides what the container needs, so annotations come first.
            driver = model.Driver(found.get("driver", model.Driver.DOCKER))
            ppath: _Path = (*tpath, "spec")
            pod = self.sub(template, tpath, "spec", ("containers", "nodeSelector"))
            if pod is not None:
                node_selector = self.labels((*ppath, "nodeSelector"), pod.get("nodeSelector"))
                containers = self.items((*ppath, "containers"), pod.get("containers"))
                if containers is not None and not containers:
                    self.error((*ppath, "containers"), "required: one container")
                elif containers is not None:
                    if len(containers) > 1:
                        self.error(
                            (*ppath, "containers"),
                            f"shoal runs one container per replica, got {len(containers)} containers",
                        )
                    container = self.container((*ppath, "containers", 0), containers[0], driver)

        if match_labels is not None and template_labels is not None:
            have = dict(template_labels)
            missing = [f"{k}={v}" for k, v in match_labels if have.get(k) != v]
            if missing:
                self.error(
                    (*path, "selector", "matchLabels"),
                    f"does not match the template's labels: {', '.join(missing)} "
                    "not in spec.template.metadata.labels",
                )

        strategy, rolling = self.strategy(spec, path)

        if self.errors > before:
            return name, None
        assert name is not None and labels is not None and annotations is not None
        assert match_labels is not None and template_labels is not None and template_annotations is not None
        assert container is not None and node_selector is not None
        assert strategy is not None and rolling is not None
        # shoal's knobs are all read from `annotations`, wherever they were written (the
        # weight lives on the template); the template's own map is kept whole beside it.
        knobs = dict(annotations)
        knobs.update((k, v) for k, v in template_annotations if k.startswith(_SHOAL_PREFIX))
        return name, model.DeploymentSpec(
            name=name,
            replicas=1 if replicas is None else replicas,
            labels=labels,
            annotations=tuple(sorted(knobs.items())),
            selector=match_labels,
            template_labels=template_labels,
            template_annotations=template_annotations,
            container=container,
            node_selector=node_selector,
            strategy=strategy,
            rolling_update=rolling,
            driver=driver,
            placement=model.Placement(found.get("placement", model.Placement.BINPACK)),
            revision_history_limit=10 if history is None else history,
            min_ready_seconds=0 if min_ready is None else min_ready,
            progress_deadline_seconds=600 if deadline is None else deadline,
        )

    def weight(self, path: _Path, value: str) -> int | None:
        if _POSITIVE_DECIMAL.fullmatch(value) and 1 <= int(value) <= _INT32_MAX:
            return int(value)
        self.error(path, f'must be a positive integer (as a string, e.g. "3"), got {_show(value)}')
        return None

    def strategy(self, spec: dict[str, Any], path: _Path) -> tuple[str | None, model.RollingUpdate | None]:
        spath: _Path = (*path, "strategy")
        strategy = self.sub(spec, path, "strategy", ("type", "rollingUpdate"))
        if strategy is None:
            return None, None
        kind: str | None = "RollingUpdate"
        if strategy.get("type") is not None:
            kind = self.choice((*spath, "type"), strategy["type"], _STRATEGIES)
        rupath: _Path = (*spath, "rollingUpdate")
        ru = self.sub(strategy, spath, "rollingUpdate", ("maxSurge", "maxUnavailable"))
        if ru is None:
            return kind, None
        if ru and kind == "Recreate":
            self.error(rupath, "not allowed when strategy.type is Recreate")
            return kind, None
        defaults = model.RollingUpdate()
        surge = self.int_or_percent((*rupath, "maxSurge"), ru.get("maxSurge"), defaults.max_surge, 100_000)
        unavailable = self.int_or_percent(
            (*rupath, "maxUnavailable"), ru.get("maxUnavailable"), defaults.max_unavailable, 100
        )
        if surge is None or unavailable is None:
            return kind, None
        if _is_zero(surge) and _is_zero(unavailable):
            self.error((*rupath, "maxUnavailable"), "may not be 0 when maxSurge is 0 (the rollout could never progress)")
            return kind, None
        return kind, model.RollingUpdate(max_surge=surge, max_unavailable=unavailable)

    def int_or_percent(self, path: _Path, value: object, default: int | str, max_percent: int) -> int | str | None:
        if value is None:
            return default
        if _is_int(value) and 0 <= value <= _INT32_MAX:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        if isinstance(value, str) and _PERCENT.fullmatch(value) and int(value[:-1]) <= max_percent:
            return value
        limit = f" up to {max_percent}%" if max_percent <= 100 else ""
        self.error(path, f'must be an integer >= 0 or a percentage like "25%"{limit}, got {_show(value)}')
        return None

    # -- containers

    def container(self, path: _Path, value: object, driver: model.Driver) -> model.Container | None:
        c = self.mapping(
            path,
            value,
            (
                "name",
                "image",
                "command",
                "args",
                "env",
                "ports",
                "resources",
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
            ),
        )
        if c is None:
            return None
        before = self.errors
        name = self.string(c, path, "name", required=True)
        if name is not None:
            self.dns_label((*path, "name"), name)
        image = self.string(c, path, "image")
        if image is not None and (len(image) > 255 or not _IMAGE.fullmatch(image)):
            self.error(
                (*path, "image"),
                "must be an image reference like nginx:1.27 or registry:5000/team/app@sha256:..., "
                f"got {_show(image)}",
            )
        command = self.strings(c, path, "command")
        args = self.strings(c, path, "args")
        if driver is model.Driver.DOCKER and image is None and c.get("image") is None:
            self.error(
                (*path, "image"),
                f"required (or set {model.ANNOTATION_DRIVER}: process and give a command)",
            )
        if driver is model.Driver.PROCESS and not command and c.get("command") in (None, []):
            self.error(
                (*path, "command"),
                f"required with {model.ANNOTATION_DRIVER}: process (no image supplies one)",
            )
        env = self.env((*path, "env"), c.get("env"))
        ports = self.ports((*path, "ports"), c.get("ports"))
        requests, limits = self.resources((*path, "resources"), c.get("resources"))
        probes = {
            key: self.probe((*path, key), c.get(key), ports, key != "readinessProbe")
            for key in ("livenessProbe", "readinessProbe", "startupProbe")
        }
        if self.errors > before:
            return None
        assert name is not None and env is not None and ports is not None
        assert requests is not None and limits is not None
        return model.Container(
            name=name,
            image=image or "",
            command=command or (),
            args=args or (),
            env=env,
            ports=ports,
            requests=requests,
            limits=limits,
            liveness_probe=probes["livenessProbe"],
            readiness_probe=probes["readinessProbe"],
            startup_probe=probes["startupProbe"],
        )

    def env(self, path: _Path, value: object) -> tuple[tuple[str, str], ...] | None:
        entries = self.items(path, value)
        if entries is None:
            return None
        out: list[tuple[str, str]] = []
        ok = True
        for i, entry in enumerate(entries):
            p = (*path, i)
            e = self.mapping(p, entry, ("name", "value"))
            if e is None:
                ok = False
                continue
            name = self.string(e, p, "name", required=True)
            if name is not None and ("=" in name or "\0" in name or not name):
                self.error((*p, "name"), f"must be a non-empty name without '=', got {_show(name)}")
                name = None
            text = self.string(e, p, "value")
            if name is None or (text is None and e.get("value") is not None):
                ok = False
                continue
            out.append((name, text or ""))
        return tuple(out) if ok else None

    def ports(self, path: _Path, value: object) -> tuple[model.ContainerPort, ...] | None:
        entries = self.items(path, value)
        if entries is None:
            return None
        out: list[model.ContainerPort] = []
        names: dict[str, int] = {}
        numbers: dict[tuple[int, str], int] = {}
        ok = True
        for i, entry in enumerate(entries):
            p = (*path, i)
            e = self.mapping(p, entry, ("containerPort", "name", "protocol"))
            if e is None:
                ok = False
                continue
            number = self.integer(e, p, "containerPort", 1, 65535, required=True)
            name = ""
            if e.get("name") is not None:
                name = self.port_name((*p, "name"), e["name"]) or ""
                if name and name in names:
                    self.error((*p, "name"), f'duplicate port name "{name}" (also ports[{names[name]}])')
                    ok = False
                if name:
                    names.setdefault(name, i)
            protocol = "TCP"
            if e.get("protocol") is not None:
                protocol = self.choice((*p, "protocol"), e["protocol"], ("TCP", "UDP")) or ""
            if number is None or not protocol or (e.get("name") is not None and not name):
                ok = False
                continue
            if (number, protocol) in numbers:
                self.error(
                    (*p, "containerPort"),
                    f"duplicate port {number}/{protocol} (also ports[{numbers[number, protocol]}])",
                )
                ok = False
            numbers.setdefault((number, protocol), i)
            out.append(model.ContainerPort(container_port=number, name=name, protocol=protocol))
        return tuple(out) if ok else None

    def resources(self, path: _Path, value: object) -> tuple[model.Resources | None, model.Resources | None]:
        r = self.mapping(path, value, ("requests", "limits"))
        if r is None:
            return None, None
        parsed: dict[str, model.Resources | None] = {}
        for key in ("requests", "limits"):
            p = (*path, key)
            m = self.mapping(p, r.get(key), ("cpu", "memory"))
            if m is None:
                parsed[key] = None
                continue
            cpu = self.quantity((*p, "cpu"), m.get("cpu"), parse_cpu)
            memory = self.quantity((*p, "memory"), m.get("memory"), parse_memory)
            bad = (cpu is None and m.get("cpu") is not None) or (memory is None and m.get("memory") is not None)
            parsed[key] = None if bad else model.Resources(cpu_millis=cpu, memory_bytes=memory)
        requests, limits = parsed["requests"], parsed["limits"]
        if requests is not None and limits is not None:
            for attr, shown in (("cpu_millis", "cpu"), ("memory_bytes", "memory")):
                asked, cap = getattr(requests, attr), getattr(limits, attr)
                if asked is not None and cap is not None and asked > cap:
                    self.error(
                        (*path, "requests", shown),
                        f"must be less than or equal to the {shown} limit "
                        f"{_show(r['limits'][shown])}, got {_show(r['requests'][shown])}",
                    )
        return requests, limits

    def quantity(self, path: _Path, value: object, parse: Callable[[object], int]) -> int | None:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as e:
            self.error(path, str(e))
            return None

    def probe(
        self, path: _Path, value: object, ports: tuple[model.ContainerPort, ...] | None, single_success: bool
    ) -> model.Probe | None:
        if value is None:
            return None
        p = self.mapping(path, value, (*_PROBE_HANDLERS, *_PROBE_TIMINGS))
        if p is None:
            return None
        handlers = [h for h in _PROBE_HANDLERS if h in p]
        if len(handlers) != 1:
            got = f" (got {', '.join(handlers)})" if handlers else ""
            self.error(path, f"needs exactly one handler: httpGet, tcpSocket, exec or grpc{got}")
            return None
        before = self.errors
        handler = handlers[0]
        hpath: _Path = (*path, handler)
        kind = _PROBE_HANDLERS[handler]
        fields: dict[str, Any] = {}
        if kind is model.ProbeKind.HTTP:
            h = self.mapping(hpath, p[handler], ("path", "port", "scheme"))
            if h is not None:
                fields["port"] = self.probe_port(hpath, h, ports)
                url_path = self.string(h, hpath, "path")
                if url_path is not None and not url_path.startswith("/"):
                    self.error((*hpath, "path"), f'must start with "/", got {_show(url_path)}')
                fields["path"] = url_path or "/"
                if h.get("scheme") is not None and h["scheme"] != "HTTP":
                    self.error((*hpath, "scheme"), f"only HTTP is supported by shoal, got {_show(h['scheme'])}")
        elif kind is model.ProbeKind.TCP:
            h = self.mapping(hpath, p[handler], ("port",))
            if h is not None:
                fields["port"] = self.probe_port(hpath, h, ports)
        elif kind is model.ProbeKind.EXEC:
            h = self.mapping(hpath, p[handler], ("command",))
            if h is not None:
                command = self.strings(h, hpath, "command")
                if command == ():
                    self.error((*hpath, "command"), "required: the command to run (exit status 0 is success)")
                fields["command"] = command
        else:
            h = self.mapping(hpath, p[handler], ("port", "service"))
            if h is not None:
                fields["port"] = self.integer(h, hpath, "port", 1, 65535, required=True)
                fields["service"] = self.string(h, hpath, "service") or ""
        defaults = model.Probe(kind=kind)
        timings = {
            "initial_delay_seconds": self.integer(p, path, "initialDelaySeconds", 0),
            "period_seconds": self.integer(p, path, "periodSeconds", 1),
            "timeout_seconds": self.integer(p, path, "timeoutSeconds", 1),
            "success_threshold": self.integer(p, path, "successThreshold", 1),
            "failure_threshold": self.integer(p, path, "failureThreshold", 1),
        }
        if single_success and timings["success_threshold"] not in (None, 1):
            self.error((*path, "successThreshold"), f"must be 1 for a {path[-1]}, got {p['successThreshold']}")
        if self.errors > before or h is None:
            return None
        return model.Probe(
            kind=kind,
            port=fields.get("port"),
            path=fields.get("path", defaults.path),
            command=fields.get("command") or (),
            service=fields.get("service", ""),
            initial_delay_seconds=float(_or(timings["initial_delay_seconds"], defaults.initial_delay_seconds)),
            period_seconds=float(_or(timings["period_seconds"], defaults.period_seconds)),
            timeout_seconds=float(_or(timings["timeout_seconds"], defaults.timeout_seconds)),
            success_threshold=int(_or(timings["success_threshold"], defaults.success_threshold)),
            failure_threshold=int(_or(timings["failure_threshold"], defaults.failure_threshold)),
        )

    def probe_port(
        self, path: _Path, handler: dict[str, Any], ports: tuple[model.ContainerPort, ...] | None
    ) -> int | None:
        """A probe's port: a number, or the name of one of this container's ports (None:
        the ports are invalid and already reported, so a name cannot be checked)."""
        value = handler.get("port")
        p = (*path, "port")
        if value is None:
            self.error(p, "required")
            return None
        if _is_port_name(value):
            if ports is None:
                return None
            for port in ports:
                if port.name == value:
                    return port.container_port
            named = [port.name for port in ports if port.name]
            known = f"its ports are named {', '.join(named)}" if named else "it has no named ports"
            self.error(p, f'no port named "{value}" in this container ({known})')
            return None
        if _is_port(value):
            return value  # type: ignore[no-any-return]
        self.error(p, f"must be a port number between 1 and 65535 or a container port name, got {_show(value)}")
        return None

    # -- services

    def service(self, doc: dict[str, Any]) -> tuple[str | None, model.ServiceSpec | None]:
        algorithm = [model.Algorithm.ROUND_ROBIN]
        dataplane: list[tuple[_Path, model.DataPlane]] = []

        def balance(path: _Path, value: str) -> object:
            choice = self.choice(path, value, [a.value for a in model.Algorithm])
            if choice is not None:
                algorithm[0] = model.Algorithm(choice)
            return choice

        def plane(path: _Path, value: str) -> object:
            choice = self.choice(path, value, [d.value for d in model.DataPlane])
            if choice is not None:
                dataplane.append((path, model.DataPlane(choice)))
            return choice

        protocol: list[tuple[_Path, model.AppProtocol]] = []
        hash_header: list[tuple[_Path, str]] = []

        def app_protocol(path: _Path, value: str) -> object:
            choice = self.choice(path, value, [a.value for a in model.AppProtocol])
            if choice is not None:
                protocol.append((path, model.AppProtocol(choice)))
            return choice

        def header(path: _Path, value: str) -> object:
            if len(value) > 64 or not _HEADER_NAME.fullmatch(value):
                self.error(path, f"must be an HTTP header name (letters, digits and -, at most 64), got {_show(value)}")
                return None
            hash_header.append((path, value))
            return value

        name, labels, annotations = self.metadata(
            doc,
            {
                model.ANNOTATION_BALANCE: balance,
                model.ANNOTATION_DATAPLANE: plane,
                model.ANNOTATION_PROTOCOL: app_protocol,
                model.ANNOTATION_HASH_HEADER: header,
            },
        )
        if dataplane and dataplane[0][1] is model.DataPlane.KERNEL and algorithm[0] not in model.KERNEL_ALGORITHMS:
            kernel = [a.value for a in model.Algorithm if a in model.KERNEL_ALGORITHMS]
            self.error(
                dataplane[0][0],
                f"the kernel data plane balances with {' or '.join(kernel)} only (nftables numgen), "
                f"not {algorithm[0].value}: set shoal.io/balance to one of those, or remove "
                "shoal.io/dataplane to use the proxy, which has every algorithm",
            )
            annotations = None
        path: _Path = ("spec",)
        if doc.get("spec") is None:
            self.error(path, "required")
            return name, None
        spec = self.sub(doc, (), "spec", ("selector", "ports", "type"))
        if spec is None:
            return name, None
        selector = None
        if not spec.get("selector"):
            self.error((*path, "selector"), "required: the labels of the replicas this service sends traffic to")
        else:
            selector = self.labels((*path, "selector"), spec["selector"])
        kind: str | None = "ClusterIP"
        if spec.get("type") is not None:
            kind = self.choice((*path, "type"), spec["type"], _SERVICE_TYPES)
        default_protocol = protocol[0][1] if protocol else model.AppProtocol.TCP
        ports = self.service_ports((*path, "ports"), spec.get("ports"), kind, default_protocol)
        if ports is not None and dataplane and dataplane[0][1] is model.DataPlane.KERNEL:
            for i, sp in enumerate(ports):
                if sp.app_protocol is model.AppProtocol.HTTP:
                    where = (*path, "ports", i, "appProtocol") if self._has_app_protocol(spec, i) else protocol[0][0]
                    self.error(
                        where,
                        "http needs the proxy (the kernel data plane forwards TCP and cannot parse HTTP): "
                        "remove shoal.io/dataplane: kernel, or use tcp",
                    )
                    ports = None
                    break
        if hash_header and ports is not None:
            if algorithm[0] is not model.Algorithm.CONSISTENT_HASH:
                self.error(hash_header[0][0], "only used with shoal.io/balance: consistent_hash")
                ports = None
            elif not any(sp.app_protocol is model.AppProtocol.HTTP for sp in ports):
                self.error(hash_header[0][0], "only used on http ports (set appProtocol: http or shoal.io/protocol: http)")
                ports = None
        if name is None or labels is None or annotations is None or selector is None or kind is None or ports is None:
            return name, None
        return name, model.ServiceSpec(
            name=name,
            selector=selector,
            ports=ports,
            type=kind,
            labels=labels,
            annotations=annotations,
            algorithm=algorithm[0],
            dataplane=dataplane[0][1] if dataplane else model.DataPlane.PROXY,
            hash_header=hash_header[0][1] if hash_header else "",
        )

    @staticmethod
    def _has_app_protocol(spec: dict[str, Any], i: int) -> bool:
        entries = spec.get("ports")
        return isinstance(entries, list) and isinstance(entries[i], dict) and entries[i].get("appProtocol") is not None

    def service_ports(self, path: _Path, value: object, kind: str | None,
                      default_protocol: model.AppProtocol = model.AppProtocol.TCP) -> tuple[model.ServicePort, ...] | None:
        entries = self.items(path, value)
        if entries is None:
            return None
        if not entries:
            self.error(path, "required: at least one port")
            return None
        out: list[model.ServicePort] = []
        names: dict[str, int] = {}
        numbers: dict[int, int] = {}
        node_ports: dict[int, int] = {}
        before = self.errors
        for i, entry in enumerate(entries):
            p = (*path, i)
            e = self.mapping(p, entry, ("name", "port", "targetPort", "nodePort", "protocol", "appProtocol"))
            if e is None:
                continue
            name = ""
            if e.get("name") is not None:
                name = self.dns_label((*p, "name"), e["name"]) or ""
                if name and name in names:
                    self.error((*p, "name"), f'duplicate port name "{name}" (also ports[{names[name]}])')
                if name:
                    names.setdefault(name, i)
            elif len(entries) > 1:
                self.error((*p, "name"), "required when a service has more than one port")
            port = self.integer(e, p, "port", 1, 65535, required=True)
            if port is not None:
                if port in numbers:
                    self.error((*p, "port"), f"duplicate port {port} (also ports[{numbers[port]}])")
                numbers.setdefault(port, i)
            # Defaults to `port`, as in Kubernetes; a name is resolved when endpoints are built.
            target: int | str | None = port
            raw_target = e.get("targetPort")
            if raw_target is not None:
                target = raw_target if _is_port(raw_target) or _is_port_name(raw_target) else None
                if target is None:
                    self.error(
                        (*p, "targetPort"),
                        "must be a port number between 1 and 65535 or a container port name, "
                        f"got {_show(raw_target)}",
                    )
            node_port = None
            if e.get("nodePort") is not None:
                node_port = self.integer(e, p, "nodePort", 30000, 32767)
                if kind == "ClusterIP":
                    self.error((*p, "nodePort"), "only allowed when type is NodePort or LoadBalancer")
                if node_port is not None:
                    if node_port in node_ports:
                        self.error((*p, "nodePort"), f"duplicate nodePort {node_port} (also ports[{node_ports[node_port]}])")
                    node_ports.setdefault(node_port, i)
            protocol = e.get("protocol")
            if protocol == "UDP":
                self.error((*p, "protocol"), "UDP is not supported by shoal yet (the service proxy forwards TCP)")
            elif protocol is not None and protocol != "TCP":
                self.error((*p, "protocol"), f"must be TCP, got {_show(protocol)}")
            app_protocol = default_protocol
            if e.get("appProtocol") is not None:
                choice = self.choice((*p, "appProtocol"), e["appProtocol"], [a.value for a in model.AppProtocol])
                app_protocol = model.AppProtocol(choice) if choice is not None else app_protocol
            if port is not None and target is not None:
                out.append(model.ServicePort(port=port, target_port=target, name=name, node_port=node_port,
                                             app_protocol=app_protocol))
        if self.errors > before:
            return None
        return tuple(out)


_MISPLACED = {
    model.ANNOTATION_BALANCE: "applies to a Service, not a Deployment",
    model.ANNOTATION_DATAPLANE: "applies to a Service, not a Deployment",
    model.ANNOTATION_DRIVER: "applies to a Deployment (metadata or spec.template.metadata), not a Service",
    model.ANNOTATION_HASH_HEADER: "applies to a Service, not a Deployment",
    model.ANNOTATION_PROTOCOL: "applies to a Service, not a Deployment",
    model.ANNOTATION_PLACEMENT: "belongs in the Deployment's metadata.annotations",
    model.ANNOTATION_WEIGHT: "belongs in the Deployment's spec.template.metadata.annotations (it weighs each replica)",
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_port(value: object) -> bool:
    return _is_int(value) and 1 <= value <= 65535  # type: ignore[operator]


def _is_port_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 15 and _PORT_NAME.fullmatch(value) is not None


def _is_zero(value: int | str) -> bool:
    return value == 0 or (isinstance(value, str) and int(value[:-1]) == 0)


def _or(value: int | None, default: float | int) -> float | int:
    return default if value is None else value
