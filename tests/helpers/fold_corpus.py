"""Small ONNX models for the fold pass's odd corners (tests/onnx/test_fold_speed_adversarial.py): names shared
across roles, graph outputs and overridable inputs among the weights, Shape readers, chains, fan-out, unnamed
and same-named nodes, IR 3, float16/float64, If/Loop bodies and model-local functions, constant subgraphs,
disguised affines and multi-branch blocks. Each builder returns (model, feeds); statistics are random and far
from the defaults. Builders need only onnx and numpy (the same corpus can be folded by any bnfold)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import random_bn

C = 4
X = (2, C, 6, 6)
F = TensorProto.FLOAT


class B:
    def __init__(self, seed: int, dtype=np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_inputs: list[onnx.ValueInfoProto] = []
        self.extra_outputs: list[onnx.ValueInfoProto] = []

    def init(self, name, value, dtype=None):
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(dtype or self.dtype), name))
        return name

    def w(self, name, shape=(C, C, 3, 3)):
        return self.init(name, self.rng.normal(0, 0.3, shape))

    def vec(self, name, lo=0.5, hi=2.0):
        return self.init(name, self.rng.uniform(lo, hi, C))

    def node(self, op, ins, outs, name=None, **attrs):
        n = helper.make_node(op, list(ins), list(outs), **attrs)
        if name is not None:
            n.name = name
        self.nodes.append(n)
        return outs[0]

    def conv(self, name, x, w=None, b=None, named=True, **attrs):
        w = w or self.w(f"{name}_w")
        ins = [x, w] + ([b] if b else [])
        return self.node("Conv", ins, [f"{name}_y"], name=name if named else None, pads=[1, 1, 1, 1], **attrs)

    def bn(self, name, x, params=None, named=True, out=None, eps=1e-3):
        if params is None:
            st = random_bn(self.rng, C)
            params = [self.init(f"{name}_{k}", st[k]) for k in ("gamma", "beta", "mean", "var")]
        return self.node("BatchNormalization", [x, *params], [out or f"{name}_out"],
                         name=name if named else None, epsilon=eps)

    def out(self, name, shape=None):
        et = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.extra_outputs.append(helper.make_tensor_value_info(name, et, shape))

    def model(self, outputs, ir=8, opset=17, functions=(), domains=(), inits_as_inputs=()) -> onnx.ModelProto:
        et = helper.np_dtype_to_tensor_dtype(self.dtype)
        ins = [helper.make_tensor_value_info("x", et, list(X)), *self.extra_inputs]
        ins += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
                if t.name in inits_as_inputs or inits_as_inputs == "all"]
        outs = [helper.make_tensor_value_info(o, et, None) for o in outputs] + self.extra_outputs
        g = helper.make_graph(self.nodes, "g", ins, outs, self.inits)
        ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
        m = helper.make_model(g, opset_imports=ops, producer_name="bnfold-tests", functions=list(functions))
        m.ir_version = ir
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
        for o in m.graph.output:
            v = known.get(o.name)
            if o.type.tensor_type.HasField("shape"):
                continue
            if v is not None and v.type.tensor_type.HasField("shape"):
                o.type.tensor_type.shape.CopyFrom(v.type.tensor_type.shape)
            else:  # (not inferred, as after a Reshape to a Shape's output: rank 4, sizes unknown)
                for k in range(len(X)):
                    o.type.tensor_type.shape.dim.add().dim_param = f"{o.name}_d{k}"
        return m

    def feeds(self):
        return {"x": self.rng.normal(0, 1, X).astype(self.dtype)}


def shared_weight(seed=0):
    b = B(seed)
    w = b.w("w")
    y1 = b.bn("bn1", b.conv("c1", "x", w=w))
    y2 = b.bn("bn2", b.conv("c2", "x", w=w))
    return b.model([b.node("Add", [y1, y2], ["y"])]), b.feeds()


def shared_bias(seed=0):
    b = B(seed)
    bias = b.init("bias", b.rng.normal(0, 1, C))
    y1 = b.bn("bn1", b.conv("c1", "x", b=bias))
    y2 = b.bn("bn2", b.conv("c2", y1, b=bias))
    return b.model([y2]), b.feeds()


def bias_read_elsewhere(seed=0):
    """A conv bias also read by another node (through an Unsqueeze), and a Mul after the second BN."""
    b = B(seed)
    scale = b.init("scale", b.rng.normal(0, 1, (C, 1, 1)))
    y1 = b.bn("bn1", b.conv("c1", "x", b=b.init("b1", b.rng.normal(0, 1, C))))
    t = b.node("Relu", [y1], ["t"], name="relu")
    flat = b.init("flat", b.rng.normal(0, 1, C))
    y2 = b.bn("bn2", b.conv("c2", t, b=flat))
    m2 = b.node("Mul", [y2, scale], ["m2"], name="mul_other")
    b.node("Mul", [y1, b.node("Unsqueeze", [flat, b.init("ax", np.array([1, 2]), np.int64)], ["fl3"],
                                 name="unsq")], ["z"], name="reads_flat")
    return b.model([m2, "z"]), b.feeds()


def weight_is_output(seed=0):
    b = B(seed)
    w = b.w("w")
    y = b.bn("bn", b.conv("c", "x", w=w, b=b.vec("cb")))
    b.out("w", [C, C, 3, 3])
    b.out("cb", [C])
    return b.model([y]), b.feeds()


def shape_readers(seed=0):
    b = B(seed)
    c = b.conv("c", "x", b=b.vec("cb"))
    y = b.bn("bn", c)
    s = b.node("Shape", [c], ["s"], name="shape")
    b.node("Size", [c], ["z"], name="size")
    r = b.node("Reshape", [y, s], ["r"], name="reshape")
    b.extra_outputs.append(helper.make_tensor_value_info("z", TensorProto.INT64, []))
    return b.model([r]), b.feeds()


def conv_out_also_read(seed=0):
    b = B(seed)
    c = b.conv("c", "x")
    y = b.bn("bn", c)
    s = b.node("Shape", [c], ["s"], name="shape")
    r = b.node("Reshape", [y, s], ["r"], name="reshape")
    q = b.node("Relu", [c], ["q"], name="relu_reads_conv")  # a second real reader: no fold
    return b.model([r, q]), b.feeds()


def conv_out_is_output(seed=0):
    b = B(seed)
    c = b.conv("c", "x")
    y = b.bn("bn", c)
    return b.model([y, c]), b.feeds()


def bn_out_is_output(seed=0):
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    z = b.bn("bn2", b.conv("c2", y))
    return b.model([y, z]), b.feeds()


def bn_then_mul_add(seed=0):
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    m = b.node("Mul", [y, b.init("s", b.rng.uniform(0.5, 2, (C, 1, 1)))], ["m"], name="mul")
    a = b.node("Add", [m, b.init("t", b.rng.normal(0, 1, (C, 1, 1)))], ["a"], name="add")
    y2 = b.bn("bn2", b.conv("c2", a))
    d = b.node("Div", [y2, b.init("dv", b.rng.uniform(0.5, 2, (C, 1, 1)))], ["dq"], name="div")
    s = b.node("Sub", [d, b.init("u", b.rng.normal(0, 1, (C, 1, 1)))], ["sub"], name="sub")
    return b.model([s]), b.feeds()


def bn_chain(seed=0):
    b = B(seed)
    y = b.bn("bn1", b.conv("c", "x"))
    y = b.bn("bn2", y)
    y = b.bn("bn3", y)
    z = b.bn("bn4", b.bn("bn5", b.node("Relu", [y], ["r"], name="relu")))
    return b.model([b.conv("c2", z)]), b.feeds()


def fan_out(seed=0):
    b = B(seed)
    y = b.bn("bn1", b.conv("c1", "x"))
    r = b.node("Relu", [y], ["r"], name="relu")
    y2 = b.bn("bn2", b.conv("c2", r))
    y3 = b.bn("bn3", b.conv("c3", r))
    y4 = b.bn("bn4", b.conv("c4", y2))
    return b.model([y3, y4, r]), b.feeds()


def unnamed(seed=0):
    b = B(seed)
    y = b.bn("bn1", b.conv("c1", "x", named=False), named=False)
    y = b.bn("bn2", b.conv("c2", y, named=False, b=b.vec("cb")), named=False)
    y = b.bn("bn3", b.conv("c3", y, named=True), named=False)
    return b.model([y]), b.feeds()


def duplicate_names(seed=0):
    b = B(seed)
    y = b.conv("c1", "x")
    b.nodes[-1].name = "same"
    y = b.bn("bn1", y)
    b.nodes[-1].name = "same"
    y = b.conv("c2", y)
    b.nodes[-1].name = "same"
    y = b.bn("bn2", y)
    b.nodes[-1].name = "same"
    return b.model([y]), b.feeds()


def ir3(seed=0):
    b = B(seed)
    y = b.bn("bn1", b.conv("c1", "x"))
    y = b.bn("bn2", b.conv("c2", y, b=b.vec("cb")))
    return b.model([y], ir=3, opset=9, inits_as_inputs="all"), b.feeds()


def overridable(seed=0, which=("c1_w",)):
    b = B(seed)
    y = b.bn("bn1", b.conv("c1", "x", b=b.vec("c1_b")))
    y = b.bn("bn2", b.conv("c2", y, b=b.vec("c2_b")))
    return b.model([y], inits_as_inputs=which), b.feeds()


def float_kind(seed=0, dtype=np.float16):
    b = B(seed, dtype)
    y = b.bn("bn1", b.conv("c1", "x", b=b.vec("cb")))
    y = b.bn("bn2", b.conv("c2", y))
    return b.model([y]), b.feeds()


def mixed_float(seed=0):
    """A float32 conv whose BN reads float16 statistics through Casts: the batch must not take it."""
    b = B(seed)
    c = b.conv("c", "x")
    st = random_bn(b.rng, C)
    ps = []
    for k in ("gamma", "beta", "mean", "var"):
        h = b.init(f"h_{k}", st[k], np.float16)
        ps.append(b.node("Cast", [h], [f"p_{k}"], name=f"cast_{k}", to=F))
    return b.model([b.bn("bn", c, params=ps)]), b.feeds()


def constant_weights(seed=0):
    """Weight from Constant -> Cast, BN statistics from Constant nodes (the sweep follows them back)."""
    b = B(seed)
    wv = b.rng.normal(0, 0.3, (C, C, 3, 3)).astype(np.float16)
    b.node("Constant", [], ["w16"], name="wconst", value=numpy_helper.from_array(wv, "w16v"))
    b.node("Cast", ["w16"], ["w"], name="wcast", to=F)
    st = random_bn(b.rng, C)
    ps = []
    for k in ("gamma", "beta", "mean", "var"):
        ps.append(b.node("Constant", [], [f"k_{k}"], name=f"const_{k}",
                         value=numpy_helper.from_array(st[k].astype(np.float32), f"k_{k}v")))
    y = b.bn("bn", b.conv("c", "x", w="w"), params=ps)
    y2 = b.bn("bn2", b.conv("c2", y))
    return b.model([y2]), b.feeds()


def shared_params(seed=0):
    """Two BNs with one set of statistics; a statistic also read by a node and one a graph output."""
    b = B(seed)
    st = random_bn(b.rng, C)
    ps = [b.init(f"p_{k}", st[k]) for k in ("gamma", "beta", "mean", "var")]
    y1 = b.bn("bn1", b.conv("c1", "x"), params=ps)
    y2 = b.bn("bn2", b.conv("c2", y1), params=ps)
    ps3 = [b.vec("g3"), b.init("b3", b.rng.normal(0, 1, C)), b.init("m3", b.rng.normal(0, 1, C)), b.vec("v3")]
    y3 = b.bn("bn3", b.conv("c3", y2), params=ps3)
    b.out("m3", [C])
    b.node("Identity", ["g3"], ["g3_copy"], name="reads_g3")
    b.out("g3_copy", [C])
    return b.model([y3]), b.feeds()


def unused_initializers(seed=0):
    """Initializers nobody reads before the fold: they stay (the sweep drops only what folding released)."""
    b = B(seed)
    b.init("unused", np.ones(3))
    b.init("unused_in", np.ones(3))
    y = b.bn("bn", b.conv("c", "x"))
    m = b.model([y])
    m.graph.input.append(helper.make_tensor_value_info("unused_in", F, [3]))
    return m, b.feeds()


def disguised(seed=0):
    """Conv -> Mul -> Add by per-channel constants (no BN) and a Conv -> Div -> Sub, beside a Conv -> BN."""
    b = B(seed)
    y = b.bn("bn", b.conv("c0", "x"))
    c = b.conv("c1", y)
    m = b.node("Mul", [c, b.init("s", b.rng.uniform(0.5, 2, (C, 1, 1)))], ["m"], name="mul")
    a = b.node("Add", [m, b.init("t", b.rng.normal(0, 1, (C, 1, 1)))], ["a"], name="add")
    c2 = b.conv("c2", a)
    d = b.node("Div", [c2, b.init("dv", b.rng.uniform(0.5, 2, (C, 1, 1)))], ["dq"], name="div")
    s = b.node("Sub", [d, b.init("u", b.rng.normal(0, 1, (C, 1, 1)))], ["sub"], name="sub")
    return b.model([s]), b.feeds()


def only_div(seed=0):
    b = B(seed)
    c = b.conv("c1", "x")
    d = b.node("Div", [c, b.init("dv", b.rng.uniform(0.5, 2, (C, 1, 1)))], ["dq"], name="div")
    return b.model([b.bn("bn", b.conv("c2", d))]), b.feeds()


def custom_domain_mul(seed=0):
    """A Mul in another domain: the census counts op types whatever their domain (a look, no fold)."""
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    b.node("Relu", [y], ["r"], name="relu")
    return b.model(["r"]), b.feeds()


def matmul_bn(seed=0, tail=None):
    """MatMul -> BN (a fold that inserts an Add), then `tail` ("sub", "div", "mul", None) by constants."""
    b = B(seed)
    b.node("Flatten", ["x"], ["f"], name="flat")
    mm = b.node("MatMul", ["f", b.w("mw", (C * 36, C))], ["mm"], name="mm")
    y = b.bn("bn", mm)
    if tail == "sub":
        y = b.node("Sub", [y, b.init("u", b.rng.normal(0, 1, C))], ["t"], name="tail")
    elif tail == "div":
        y = b.node("Div", [y, b.init("u", b.rng.uniform(0.5, 2, C))], ["t"], name="tail")
    elif tail == "mul":
        y = b.node("Mul", [y, b.init("u", b.rng.uniform(0.5, 2, C))], ["t"], name="tail")
    y = b.node("MatMul", [y, b.w("mw2", (C, C))], ["mm2"], name="mm2")
    y = b.bn("bn2", y)
    return b.model([y]), b.feeds()


def standalone_then_layer(seed=0):
    """BN on the input (no layer before; with --standalone affine a Mul + Add), then Conv -> BN -> Sub."""
    b = B(seed)
    y = b.bn("bn0", "x")
    r = b.node("Relu", [y], ["r"], name="relu")
    y = b.bn("bn1", b.conv("c1", r))
    s = b.node("Sub", [y, b.init("u", b.rng.normal(0, 1, (C, 1, 1)))], ["s"], name="sub")
    r2 = b.node("Relu", [s], ["r2"], name="relu2")
    y2 = b.bn("bn2", r2)
    return b.model([b.conv("c3", y2)]), b.feeds()


def backward(seed=0):
    """BN -> Conv (the BN folds into the conv after it), then BN -> BN -> Conv (the retry loop)."""
    b = B(seed)
    y = b.bn("bn0", "x")
    c = b.conv("c1", y)  # pads: the backward fold needs no padding, so this stays (a reason) -- unless...
    y = b.bn("bn1", b.bn("bn2", b.node("Relu", [c], ["r"], name="relu")))
    c2 = b.node("Conv", [y, b.w("w1x1", (C, C, 1, 1))], ["c2"], name="c2")
    return b.model([c2]), b.feeds()


def repvgg(seed=0, joiner="Add"):
    """Two Conv -> BN branches and an identity BN joined by Add (or Sum): a block regions merges."""
    b = B(seed)
    y1 = b.bn("bn1", b.conv("c1", "x"))
    y2 = b.bn("bn2", b.node("Conv", ["x", b.w("w1", (C, C, 1, 1))], ["c2_y"], name="c2"))
    y3 = b.bn("bn3", "x")
    if joiner == "Add":
        s = b.node("Add", [b.node("Add", [y1, y2], ["s1"], name="add1"), y3], ["s"], name="add2")
    else:
        s = b.node("Sum", [y1, y2, y3], ["s"], name="sum")
    return b.model([b.node("Relu", [s], ["y"], name="relu")]), b.feeds()


def repvgg_after_backward(seed=0):
    """A block whose branch BN folds only once its conv's input BN has folded back (regions.again)."""
    b = B(seed)
    z = b.bn("pre", b.conv("c0", "x"))
    y1 = b.bn("bn1", b.conv("c1", z))
    y2 = b.bn("bn2", b.node("Conv", [z, b.w("w1", (C, C, 1, 1))], ["c2_y"], name="c2"))
    s = b.node("Add", [y1, y2], ["s"], name="add")
    return b.model([s]), b.feeds()


def _body_graph(rng, tag, outer_x, chain=True, affine=False):
    bb = B(int(rng.integers(1 << 30)))
    y = bb.bn(f"{tag}bn1", bb.conv(f"{tag}c1", outer_x))
    if chain:
        y = bb.bn(f"{tag}bn2", bb.conv(f"{tag}c2", y, b=bb.vec(f"{tag}cb")))
    if affine:
        y = bb.node("Mul", [bb.conv(f"{tag}c3", y), bb.init(f"{tag}s", bb.rng.uniform(0.5, 2, (C, 1, 1)))],
                    [f"{tag}m"], name=f"{tag}mul")
    out = bb.node("Identity", [y], [f"{tag}out"], name=f"{tag}id")
    return helper.make_graph(bb.nodes, f"{tag}body", [], [helper.make_tensor_value_info(out, F, list(X))], bb.inits)


def if_bodies(seed=0, affine=False):
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    cond = b.init("cond", np.array(True), np.bool_)
    then_g = _body_graph(b.rng, "t_", y, affine=affine)
    else_g = _body_graph(b.rng, "e_", y, chain=False, affine=affine)
    b.node("If", [cond], ["yy"], name="if", then_branch=then_g, else_branch=else_g)
    return b.model(["yy"]), b.feeds()


def loop_body(seed=0):
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    bb = B(seed + 1)
    c = bb.conv("lc", "v_in")
    v = bb.bn("lbn", c)
    bb.node("Identity", ["cond_in"], ["cond_out"], name="lcond")
    body = helper.make_graph(bb.nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v_in", F, list(X))],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info(v, F, list(X))], bb.inits)
    n = b.init("n", np.array(2), np.int64)
    t = b.init("t", np.array(True), np.bool_)
    b.node("Loop", [n, t, y], ["yy"], name="loop", body=body)
    b.out("yy", list(X))
    return b.model([]), b.feeds()


def function_model(seed=0):
    """Conv -> BN inside a model-local function (weights from Constant nodes), called twice."""
    rng = np.random.default_rng(seed)
    st = random_bn(rng, C)
    consts = [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(
        rng.normal(0, 0.3, (C, C, 3, 3)).astype(np.float32), "fwv"))]
    for k in ("gamma", "beta", "mean", "var"):
        consts.append(helper.make_node("Constant", [], [f"f{k}"], value=numpy_helper.from_array(
            st[k].astype(np.float32), f"f{k}v")))
    body = consts + [helper.make_node("Conv", ["a", "fw"], ["c"], name="fconv", pads=[1, 1, 1, 1]),
                     helper.make_node("BatchNormalization", ["c", "fgamma", "fbeta", "fmean", "fvar"], ["b"],
                                      name="fbn", epsilon=1e-3)]
    fn = helper.make_function("local", "ConvBn", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    b = B(seed + 1)
    y = b.node("ConvBn", ["x"], ["y1"], name="call1", domain="local")
    y = b.bn("bn", b.conv("c", y))
    y = b.node("ConvBn", [y], ["y2"], name="call2", domain="local")
    return b.model([y], functions=[fn], domains=["local"]), b.feeds()


def long_chain(seed=0, n=12):
    b = B(seed)
    y = "x"
    for k in range(n):
        bias = b.vec(f"b{k}") if k % 3 else None
        y = b.bn(f"bn{k}", b.conv(f"c{k}", y, b=bias, named=bool(k % 4)), named=bool(k % 5))
        if k % 4 == 3:
            y = b.node("Relu", [y], [f"r{k}"], name=f"relu{k}")
    return b.model([y]), b.feeds()


CORPUS = {
    "shared_weight": shared_weight, "shared_bias": shared_bias, "bias_read_elsewhere": bias_read_elsewhere,
    "weight_is_output": weight_is_output, "shape_readers": shape_readers, "conv_out_also_read": conv_out_also_read,
    "conv_out_is_output": conv_out_is_output, "bn_out_is_output": bn_out_is_output,
    "bn_then_mul_add": bn_then_mul_add, "bn_chain": bn_chain, "fan_out": fan_out, "unnamed": unnamed,
    "duplicate_names": duplicate_names, "ir3": ir3,
    "overridable_w": lambda s=0: overridable(s, ("c1_w",)), "overridable_b": lambda s=0: overridable(s, ("c2_b",)),
    "overridable_bn": lambda s=0: overridable(s, ("bn1_gamma", "bn2_var")),
    "float16": lambda s=0: float_kind(s, np.float16), "float64": lambda s=0: float_kind(s, np.float64),
    "mixed_float": mixed_float, "constant_weights": constant_weights, "shared_params": shared_params,
    "unused_initializers": unused_initializers, "disguised": disguised, "only_div": only_div,
    "matmul_bn": matmul_bn, "matmul_bn_sub": lambda s=0: matmul_bn(s, "sub"),
    "matmul_bn_div": lambda s=0: matmul_bn(s, "div"), "matmul_bn_mul": lambda s=0: matmul_bn(s, "mul"),
    "standalone_then_layer": standalone_then_layer, "backward": backward,
    "repvgg_add": repvgg, "repvgg_sum": lambda s=0: repvgg(s, "Sum"), "repvgg_after_backward": repvgg_after_backward,
    "if_bodies": if_bodies, "if_bodies_affine": lambda s=0: if_bodies(s, True), "loop_body": loop_body,
    "function": function_model, "long_chain": long_chain,
}


def if_bodies_ir3(seed=0):
    """IR 3: the bodies' Conv -> BN read outer initializers (declared as graph inputs); a body cannot hold
    initializers, so what a fold writes there becomes Constant nodes."""
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x"))
    for tag in ("t_", "e_"):
        b.w(f"{tag}w")
        st = random_bn(b.rng, C)
        for k in ("gamma", "beta", "mean", "var"):
            b.init(f"{tag}{k}", st[k])
    bodies = []
    for tag in ("t_", "e_"):
        nodes = [helper.make_node("Conv", [y, f"{tag}w"], [f"{tag}c"], name=f"{tag}conv", pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", [f"{tag}c"] + [f"{tag}{k}" for k in
                                  ("gamma", "beta", "mean", "var")], [f"{tag}out"], name=f"{tag}bn", epsilon=1e-3)]
        bodies.append(helper.make_graph(nodes, f"{tag}body", [],
                                        [helper.make_tensor_value_info(f"{tag}out", F, list(X))]))
    cond = b.init("cond", np.array(True), np.bool_)
    b.node("If", [cond], ["yy"], name="if", then_branch=bodies[0], else_branch=bodies[1])
    b.out("yy", list(X))
    return b.model([], ir=3, opset=9, inits_as_inputs="all"), b.feeds()


def weight_read_by_body(seed=0):
    """An outer conv weight and BN statistic also read inside an If body: both stay, with their values."""
    b = B(seed)
    y = b.bn("bn", b.conv("c", "x", b=b.vec("c_b")))
    body = helper.make_graph(
        [helper.make_node("ReduceSum", ["c_w"], ["t_sw"], name="t_sw"),
         helper.make_node("ReduceSum", ["bn_mean"], ["t_sm"], name="t_sm"),
         helper.make_node("Add", ["t_sw", "t_sm"], ["t_s"], name="t_s"),
         helper.make_node("Add", [y, "t_s"], ["t_out"], name="t_add")], "then", [],
        [helper.make_tensor_value_info("t_out", F, list(X))])
    other = helper.make_graph([helper.make_node("Identity", [y], ["e_out"], name="e_id")], "else", [],
                              [helper.make_tensor_value_info("e_out", F, list(X))])
    cond = b.init("cond", np.array(True), np.bool_)
    b.node("If", [cond], ["yy"], name="if", then_branch=body, else_branch=other)
    b.out("yy", list(X))
    return b.model([]), b.feeds()


CORPUS.update({"if_bodies_ir3": if_bodies_ir3, "weight_read_by_body": weight_read_by_body})
