"""Feeds for a Keras model: the batches it is verified on, and how each input was chosen.

Unknown dimensions (None in the model's inputs) come from bnfold.verify.inputs.resolve_shape, as for
every framework: the batch axis 2, every other one 64 (never 1: a 3x3 kernel on a 1x1 image sees only
its centre, and a flipped kernel would pass), larger sizes when the model cannot run at 64. The
report lists the inputs used; --save-inputs writes them as an .npz that --inputs replays bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..core.errors import BnfoldError
from ..core.files import check_input_file
from ..core.options import InputSpec, Options
from ..verify import inputs as inp
from .files import import_keras, model_input_specs


@dataclass
class Feeds:
    """Batches of inputs (each a list of arrays in the model's input order). Reads like the list of the
    first batch's arrays, which is what a single run of the model takes."""

    batches: list[list[np.ndarray]]
    names: list[str]
    doc: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, dtype, how it was chosen
    defaulted: bool = False     # some unknown dimension was given a default size (a larger one may be tried)
    seed: int = 0

    def __getitem__(self, i: Any) -> Any:
        return self.batches[0][i]

    def __len__(self) -> int:
        return len(self.batches[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches[0])

    def by_name(self) -> list[dict[str, np.ndarray]]:
        """The batches as {input name: array} dicts (what save_npz writes)."""
        return [dict(zip(self.names, b)) for b in self.batches]


def _np_dtype(dtype: str) -> Any:
    # bfloat16 inputs are fed as float32: Keras casts them itself, and numpy has no bfloat16 of its own
    return np.dtype("float32") if dtype == "bfloat16" else np.dtype(dtype)


def _what(dt: np.dtype) -> str:
    if dt.kind == "f":
        return "random normal"
    if dt.kind in "iu":
        return f"random in [{inp.INT_RANGE[0]}, {inp.INT_RANGE[1]})"
    return "random"


def plan_feeds(model: Any, opts: Options, size: int = inp.SIZE) -> Feeds:
    """Feeds from --inputs data, else seeded random data of the model's input shapes and dtypes, unknown
    dims from --input or defaulted (batch 2, others `size`)."""
    specs = model_input_specs(model)
    names = [n for n, _, _ in specs]
    if opts.inputs_npz is not None:
        return _from_npz(specs, opts.inputs_npz)
    user = {s.name: s for s in opts.input_specs}
    if len(specs) == 1 and len(user) == 1 and names[0] not in user:
        only = next(iter(user.values()))  # one input: its name may be left out
        user = {names[0]: InputSpec(names[0], only.shape, only.dtype)}
    unknown = set(user) - set(names)
    if unknown:
        raise BnfoldError(f"--input names {sorted(unknown)} are not inputs of the model (inputs: {names})")
    named: dict[str, int] = {}
    shapes, doc, defaulted = [], {}, False
    for name, declared, dtype in specs:
        spec = user.get(name)
        if spec is not None and spec.shape and (len(spec.shape) != len(declared) or any(
                d is not None and d != u for d, u in zip(declared, spec.shape))):
            raise BnfoldError(f"--input {name}: shape {tuple(spec.shape)} does not match the model's {declared}")
        shape, how = inp.resolve_shape(name, list(declared), user, size, named)
        dt = _np_dtype(spec.dtype if spec is not None and spec.dtype else dtype)
        defaulted = defaulted or how.startswith("dynamic")
        shapes.append((name, shape, dt))
        doc[name] = {"shape": list(shape), "dtype": dt.name, "how": f"{_what(dt)} (seed {opts.seed}); {how}"}
    rng = np.random.default_rng(opts.seed)
    batches = [[inp.random_array(shape, dt, rng, name) for name, shape, dt in shapes]
               for _ in range(max(1, opts.batches))]
    if len(batches) > 1:
        for d in doc.values():
            d["batches"] = len(batches)
    return Feeds(batches, names, doc, defaulted, opts.seed)


def _from_npz(specs: list[tuple[str, tuple, str]], npz: str) -> Feeds:
    check_input_file(npz)
    try:
        with np.load(npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        text = (str(e).strip().splitlines() or [""])[0]
        raise BnfoldError(f"cannot be read as an .npz file ({type(e).__name__}: {text})", npz) from None
    names = [n for n, _, _ in specs]
    batches = []
    for k, got in enumerate(inp.npz_batches(data)):
        if all(n in got for n in names):
            arrays = [got[n] for n in names]
        elif len(got) == len(names) and k == 0:
            arrays = list(got.values())  # other names, as many arrays as inputs: by position
        else:
            raise BnfoldError(f"holds {sorted(got)}{f' for batch {k}' if k else ''} but the model's inputs are "
                              f"{names}", npz)
        for (name, shape, _), a in zip(specs, arrays):
            if a.size == 0:
                raise BnfoldError(f"array for input {name!r} has shape {a.shape}: no elements, nothing to compare",
                                  npz)
            if a.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape)):
                raise BnfoldError(f"array for input {name!r} has shape {a.shape}, the model expects {shape}", npz)
        batches.append(arrays)
    if not batches:
        raise BnfoldError("holds no arrays", npz)
    doc = {n: {"shape": list(a.shape), "dtype": a.dtype.name,
               "how": f"from {npz}" + (f" ({len(batches)} batches)" if len(batches) > 1 else "")}
           for n, a in zip(names, batches[0])}
    return Feeds(batches, names, doc)


def given(model: Any, example_inputs: Any) -> Feeds:
    """The caller's example inputs (arrays, a list of them, or a dict by input name) as one batch."""
    if isinstance(example_inputs, Feeds):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        arrays = _by_name(model, example_inputs)
    elif isinstance(example_inputs, np.ndarray) or not isinstance(example_inputs, (list, tuple)):
        arrays = [np.asarray(import_keras().ops.convert_to_numpy(example_inputs))]
    else:
        arrays = [np.asarray(import_keras().ops.convert_to_numpy(x)) for x in example_inputs]
    try:
        names = [n for n, _, _ in model_input_specs(model)]
    except BnfoldError:
        names = []
    if len(names) != len(arrays):
        names = [f"input_{i}" for i in range(len(arrays))]
    doc = {n: {"shape": list(a.shape), "dtype": a.dtype.name, "how": "given by the caller (example_inputs)"}
           for n, a in zip(names, arrays)}
    return Feeds([arrays], names, doc)


def _by_name(model: Any, example_inputs: Mapping[str, Any]) -> list[np.ndarray]:
    """A dict of inputs, in the order the model's inputs are flattened (what a run packs)."""
    keras = import_keras()
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping) and set(struct) == set(example_inputs):
        return [np.asarray(x) for x in keras.tree.flatten(dict(example_inputs))]  # same key order as struct
    names = [n for n, _, _ in model_input_specs(model)]
    if set(names) == set(example_inputs):
        return [np.asarray(example_inputs[n]) for n in names]
    raise BnfoldError(f"example_inputs names {sorted(example_inputs)} do not match the model's inputs {names}")


def feeds_for(model: Any, example_inputs: Any, opts: Options) -> Feeds:
    """The caller's example inputs, else feeds planned from the options and the model's signature."""
    if example_inputs is not None:
        return given(model, example_inputs)
    return plan_feeds(model, opts)


def runnable(model: Any, feeds: Feeds, opts: Options, run: Any) -> Feeds:
    """`feeds`, or feeds with larger default dims when the model cannot run at the default size.

    `run(model, arrays)` runs the model once; a model that cannot run on any size tried (or on inputs
    that were not defaulted) is a usage problem: BnfoldError naming the shapes."""
    sizes = (inp.SIZE, *inp.LARGER)
    k = 0
    while True:
        try:
            run(model, feeds.batches[0])
            return feeds
        except BnfoldError:
            raise
        except ImportError as e:  # a package the backend needs, not a problem with the shapes
            raise missing(e) from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            if feeds.defaulted and k + 1 < len(sizes):
                k += 1
                opts.say(f"the model cannot run with unknown dimensions of {sizes[k - 1]}; trying {sizes[k]}")
                feeds = plan_feeds(model, opts, sizes[k])
                continue
            shapes = describe(feeds.batches[0])
            tried = f"; unknown dimensions were tried at {', '.join(map(str, sizes))}" if feeds.defaulted else ""
            raise BnfoldError(f"the model cannot run on inputs of shape {shapes} ({type(e).__name__}: {first}){tried}; "
                              "give the input shapes with --input NAME:SHAPE or real data with --inputs") from None


def save(feeds: Feeds, path: str) -> None:
    """Write the exact feeds (every batch) where --inputs reads them back."""
    inp.save_npz(feeds.by_name(), path)


def describe(feeds: Sequence[np.ndarray]) -> str:
    """Shapes of a batch, for messages."""
    return ", ".join("x".join(str(d) for d in np.shape(f)) for f in feeds)


def missing(e: ImportError) -> BnfoldError:
    """A package the Keras backend in use needs at run time, named as such."""
    from .backend import name

    what = e.name or (str(e).splitlines() or ["a package"])[0]
    return BnfoldError(f"running the model on Keras backend {name()} needs {what}, which is not installed "
                       f"(ImportError: {(str(e).splitlines() or [''])[0][:160]})")
