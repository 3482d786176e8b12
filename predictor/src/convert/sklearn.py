# meshserve's scikit-learn converter: run by the sidecar once per pickle, in a process of
# its own, with a timeout. Loads the pickle as KServe's sklearnserver does (joblib, which
# reads plain pickles too), converts it with skl2onnx and keeps the one output KServe
# answers with: predict's labels or values, or predict_proba's probabilities. The output is
# named output-0 and carries scikit-learn's own datatype (float64 for values and
# probabilities, the classes' type for labels). argv: PICKLE OUT.onnx predict|predict_proba.
# stdout: {"feature_names": [...]}. Exit 2: the model cannot be served this way (the message
# says why); exit 3: a package is missing.
import json
import sys
import warnings

pickle_path, out_path, mode = sys.argv[1:4]
# Whatever the pickle's modules print goes to stderr: stdout carries only the answer.
answer, sys.stdout = sys.stdout, sys.stderr
try:
    import joblib
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
    from sklearn.base import is_classifier
except ImportError as e:
    print(f"the scikit-learn converter needs scikit-learn, skl2onnx and onnx in {sys.executable}: {e}", file=sys.stderr)
    sys.exit(3)


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        model = joblib.load(pickle_path)
    except Exception as e:  # a corrupt or foreign pickle, or one needing missing modules
        fail(f"cannot load the pickle: {type(e).__name__}: {e}")
for w in caught:
    # InconsistentVersionWarning: pickled by another scikit-learn release.
    print(f"warning: {w.message}", file=sys.stderr)

if not hasattr(model, "predict"):
    fail(f"the pickle holds a {type(model).__name__}, not an estimator with predict")
classifier = is_classifier(model)
if mode == "predict_proba" and not hasattr(model, "predict_proba"):
    # KServe's sklearnserver falls back to predict.
    print(f"warning: PREDICT_PROBA is set but {type(model).__name__} has no predict_proba: it answers predict", file=sys.stderr)
    mode = "predict"
features = getattr(model, "n_features_in_", None)
if features is None:
    fail(f"{type(model).__name__} does not say how many features it takes (n_features_in_): is it fitted?")
names = [str(n) for n in getattr(model, "feature_names_in_", [])]
final = model.steps[-1][1] if hasattr(model, "steps") else model
try:
    # Whether predict gives one value per row (skl2onnx gives regressors a column).
    flat = mode == "predict" and np.asarray(model.predict(np.zeros((1, features)))).ndim == 1
except Exception:
    flat = mode == "predict" and getattr(final, "n_outputs_", 1) == 1
options = {id(final): {"zipmap": False}} if classifier else None


def converted(tensor_type):
    onx = to_onnx(
        model,
        initial_types=[("input_0", tensor_type([None, features]))],
        options=options,
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    outputs = list(onx.graph.output)
    if classifier:
        chosen = outputs[1] if mode == "predict_proba" else outputs[0]
    else:
        chosen = outputs[0]
    elem = chosen.type.tensor_type.elem_type
    graph = onx.graph
    # skl2onnx makes names identifiers; KServe's sample requests call the input input-0.
    graph.input[0].name = "input-0"
    for node in graph.node:
        node.input[:] = ["input-0" if i == "input_0" else i for i in node.input]
    del graph.output[:]
    dims = [d for d in chosen.type.tensor_type.shape.dim]
    shape = [None] + [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    last = chosen.name
    if len(shape) == 2 and flat:
        # predict gives one value per row, skl2onnx a column: flatten it.
        graph.initializer.append(helper.make_tensor("meshserve_flat", TensorProto.INT64, [1], [-1]))
        graph.node.append(helper.make_node("Reshape", [last, "meshserve_flat"], ["meshserve_flat_out"]))
        last, shape = "meshserve_flat_out", [None]
    if elem == TensorProto.FLOAT:
        node = helper.make_node("Cast", [last], ["output-0"], to=TensorProto.DOUBLE)
        elem = TensorProto.DOUBLE
    else:
        node = helper.make_node("Identity", [last], ["output-0"])
    graph.node.append(node)
    graph.output.append(helper.make_tensor_value_info("output-0", elem, shape))
    return onx


try:
    import onnxruntime
except ImportError:
    onnxruntime = None


def runs(onx, dtype):
    session = onnxruntime.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"input-0": np.zeros((1, features), dtype=dtype)})
    return True


errors = []
# float64 only where ONNX Runtime is here to show it runs the graph; float32 always runs.
kinds = [(FloatTensorType, np.float32)]
if onnxruntime is not None:
    kinds.insert(0, (DoubleTensorType, np.float64))
for tensor_type, dtype in kinds:
    try:
        onx = converted(tensor_type)
        if onnxruntime is not None:
            runs(onx, dtype)
        break
    except Exception as e:
        errors.append(f"{tensor_type.__name__}: {type(e).__name__}: {e}")
else:
    fail("skl2onnx cannot convert it: " + "; ".join(errors))

onnx.save(onx, out_path)
answer.write(json.dumps({"feature_names": names}) + "\n")
