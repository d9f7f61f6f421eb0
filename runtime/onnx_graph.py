"""Just enough of the ONNX protobuf to vet a graph before ONNX Runtime opens it:
its input names and every external-data location it would read, in initializers,
node attributes and subgraphs alike. (The runtime does not ship the `onnx` package.)

Field numbers are from onnx.proto: ModelProto.graph=7; GraphProto node=1,
initializer=5, input=11, sparse_initializer=15; NodeProto.attribute=5;
AttributeProto t=5, g=6, tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23;
TensorProto.external_data=13; SparseTensorProto values=1, indices=2;
StringStringEntryProto key=1, value=2; ValueInfoProto.name=1.
"""

from pathlib import Path


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


def graph_facts(path: Path) -> tuple[list[str], list[str]]:
    """(input names, external-data locations) of the ONNX model at `path`."""
    model = memoryview(path.read_bytes())
    graphs = submessages(model, 7)
    if len(graphs) != 1:
        raise ProtoError("no graph in the model")
    graph = graphs[0]
    inputs = [bytes(v).decode("utf-8", "replace") for i in submessages(graph, 11)
              for n, w, v in fields(i) if n == 1 and w == 2]
    return inputs, graph_locations(graph)
