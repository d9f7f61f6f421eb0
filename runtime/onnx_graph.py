"""Just enough of the ONNX protobuf to vet a graph before ONNX Runtime opens it:
its inputs and outputs, the inputs' declared shapes, every external-data location it would read (in
initializers, node attributes and subgraphs alike), and the ops it uses, for the
TensorRT checks. (The runtime does not ship the `onnx` package.)

Field numbers are from onnx.proto: ModelProto.graph=7; GraphProto node=1,
initializer=5, input=11, output=12, sparse_initializer=15; NodeProto.attribute=5;
AttributeProto t=5, g=6, tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23;
TensorProto.external_data=13; SparseTensorProto values=1, indices=2;
StringStringEntryProto key=1, value=2; ValueInfoProto name=1, type=2; TypeProto
tensor_type=1; TypeProto.Tensor shape=2; TensorShapeProto dim=1; Dimension dim_value=1,
dim_param=2; NodeProto op_type=4, domain=7.
"""

from dataclasses import dataclass
from pathlib import Path

TENSORRT_OPS = frozenset(op for line in (Path(__file__).parent / "tensorrt_ops.txt").read_text().splitlines()
                         if not line.startswith("#") for op in line.split())
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


class ProtoError(ValueError):
    pass


def fields(buf: memoryview):
    """(field number, wire type, value): value is an int or a memoryview of the bytes."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end or shift > 63:
                raise ProtoError("truncated or malformed varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 2:
            size = varint()
            if pos + size > end:
                raise ProtoError("length-delimited field runs past the end")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ProtoError("fixed-width field runs past the end")
        else:
            raise ProtoError(f"unsupported wire type {wire}")


def submessages(buf, number):
    return [v for n, w, v in fields(buf) if n == number and w == 2]


def tensor_locations(tensor) -> list[str]:
    out = []
    for entry in submessages(tensor, 13):
        kv = {n: bytes(v).decode("utf-8", "replace") for n, w, v in fields(entry) if w == 2}
        if kv.get(1) == "location":
            out.append(kv.get(2, ""))
    return out


def graph_locations(graph) -> list[str]:
    out = [loc for t in submessages(graph, 5) for loc in tensor_locations(t)]
    for sparse in submessages(graph, 15):
        out += [loc for n in (1, 2) for t in submessages(sparse, n) for loc in tensor_locations(t)]
    for node in submessages(graph, 1):
        for attr in submessages(node, 5):
            for t in submessages(attr, 5) + submessages(attr, 10):
                out += tensor_locations(t)
            for sparse in submessages(attr, 22) + submessages(attr, 23):
                out += [loc for n in (1, 2) for t in submessages(sparse, n) for loc in tensor_locations(t)]
            for sub in submessages(attr, 6) + submessages(attr, 11):
                out += graph_locations(sub)
    return out


def text(buf) -> str:
    return bytes(buf).decode("utf-8", "replace")


def input_shape(value_info) -> list[int | str] | None:
    """Declared dims (ints or symbolic names); None where the shape is not declared."""
    for tensor in (t for typ in submessages(value_info, 2) for t in submessages(typ, 1)):
        for shape in submessages(tensor, 2):
            dims = []
            for dim in submessages(shape, 1):
                found = [v if w == 0 else text(v) for n, w, v in fields(dim) if n in (1, 2)]
                if not found:
                    return None
                dims.append(found[0])
            return dims
    return None


def graph_ops(graph) -> set[str]:
    ops = set()
    for node in submessages(graph, 1):
        parts = {n: text(v) for n, w, v in fields(node) if n in (4, 7) and w == 2}
        ops.add(f"{parts[7]}::{parts[4]}" if parts.get(7) not in (None, "", "ai.onnx") else parts.get(4, ""))
        for attr in submessages(node, 5):
            for sub in submessages(attr, 6) + submessages(attr, 11):
                ops |= graph_ops(sub)
    return ops


@dataclass(frozen=True)
class GraphFacts:
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, list[int | str] | None]
    locations: list[str]
    ops: set[str]


def graph_facts(path: Path) -> GraphFacts:
    model = memoryview(path.read_bytes())
    graphs = submessages(model, 7)
    if len(graphs) != 1:
        raise ProtoError("no graph in the model")
    graph = graphs[0]
    infos, outputs = submessages(graph, 11), submessages(graph, 12)
    names = [next((text(v) for n, w, v in fields(i) if n == 1 and w == 2), "") for i in infos + outputs]
    return GraphFacts(names[: len(infos)], names[len(infos) :], {n: input_shape(i) for n, i in zip(names, infos)},
                      graph_locations(graph), graph_ops(graph))


def tensorrt_problems(facts: GraphFacts) -> list[str]:
    """Why TensorRT could not take a graph whole: control flow, unsupported ops, undeclared shapes."""
    problems = [f"control flow op {op}" for op in sorted(facts.ops & CONTROL_FLOW)]
    problems += [f"op {op} not supported by TensorRT" for op in sorted(facts.ops - TENSORRT_OPS - CONTROL_FLOW)]
    problems += [f"input {name} has no declared shape" for name, shape in facts.shapes.items() if shape is None]
    return problems
