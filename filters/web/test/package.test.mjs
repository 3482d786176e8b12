// The npm package (filters/web/pkg, which scripts/build-web.sh builds) against meshserve itself:
// its tensors equal, element for element, the ones `meshserve transform` prints for the same
// pipeline and pictures, and its encoders and parsers round-trip through a real sidecar.
//
//   node --test filters/web/test/
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const require = createRequire(import.meta.url);
const ms = require(path.join(root, "filters/web/pkg/node/meshserve_web.js"));
const meshserve = path.join(root, "target/release/meshserve");
const isvcFile = path.join(root, "envoy-config/demo/inferenceservice.yaml");
const python = path.join(root, ".venv/bin/python");

function run(cmd, args, input) {
  const out = spawnSync(cmd, args, { cwd: root, input, maxBuffer: 64 << 20 });
  assert.equal(out.status, 0, `${cmd} ${args.join(" ")}: ${out.stderr}`);
  return out.stdout;
}

/** `meshserve transform` of a body: the request (or, with --response, the answer) it prints. */
function meshserveTransform(body, ...flags) {
  return JSON.parse(run(meshserve, ["transform", isvcFile, "--isvc", "mnist", ...flags], body));
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "meshserve-web-"));
let pipeline;
let pictures;

before(() => {
  // The pipeline as the filter gets it: the transformer in the rendered filter configuration.
  run(meshserve, ["render", isvcFile, "--out", path.join(tmp, "render")]);
  const config = JSON.parse(fs.readFileSync(path.join(tmp, "render/filter.json")));
  pipeline = config.services.find((s) => s.name === "mnist").transformer;
  assert.ok(pipeline, "the demo's mnist service has a transformer");
  // The demo's photo, and camera-like pictures of held-out digits in every kind photos.py
  // makes (JPEG and PNG, colour and grey, landscape, portrait and square).
  run(python, ["models/photos.py", "--out", path.join(tmp, "photos"), "--count", "5"]);
  pictures = [path.join(root, "models/samples/digit_photo.jpg")].concat(
    fs.readdirSync(path.join(tmp, "photos"))
      .filter((f) => /\.(jpe?g|png)$/.test(f))
      .sort()
      .map((f) => path.join(tmp, "photos", f)),
  );
  assert.equal(pictures.length, 6);
});

after(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe("the tensor is the one meshserve transform makes", () => {
  test("for each sample picture, element for element", () => {
    for (const file of pictures) {
      const bytes = fs.readFileSync(file);
      const tensor = ms.transform(pipeline, bytes);
      const body = ms.encodeV1Request([{ image: bytes }]);
      const expected = meshserveTransform(body).inputs[0];
      assert.deepEqual(tensor.shape, [1, 1, 28, 28], file);
      assert.equal(tensor.datatype, expected.datatype, file);
      assert.equal(tensor.name, expected.name, file);
      assert.equal(tensor.data.length, expected.data.length, file);
      for (let i = 0; i < expected.data.length; i++) {
        if (tensor.data[i] !== expected.data[i]) {
          assert.fail(`${file}: element ${i} is ${tensor.data[i]}, meshserve transform gives ${expected.data[i]}`);
        }
      }
      // A pipeline given as JSON text gives the same.
      assert.deepEqual(ms.transform(JSON.stringify(pipeline), bytes), tensor);
    }
  });

  test("a batch, and whole requests in V1 and V2", () => {
    const two = pictures.slice(0, 2).map((f) => fs.readFileSync(f));
    const batch = ms.transformBatch(pipeline, two);
    const v1 = ms.encodeV1Request([{ image: two[0] }, { image: two[1] }]);
    const expected = meshserveTransform(v1);
    assert.deepEqual(batch, expected.inputs[0]);
    assert.deepEqual(ms.preprocess(pipeline, v1), expected);
    const v2 = JSON.stringify({
      inputs: [{ name: "image", datatype: "BYTES", shape: [2], data: two.map((b) => b.toString("base64")) }],
    });
    assert.deepEqual(ms.preprocess(pipeline, v2, "v2"), meshserveTransform(v2, "--protocol", "v2"));
  });

  test("the answer is the one meshserve transform --response makes", () => {
    const scores = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.6, 0.08, 0.04];
    const response = JSON.stringify({
      model_name: "mnist", outputs: [{ name: "probabilities", datatype: "FP32", shape: [1, 10], data: scores }],
    });
    for (const protocol of ["v1", "v2"]) {
      assert.deepEqual(
        ms.postprocess(pipeline, response, protocol),
        meshserveTransform(response, "--response", "--protocol", protocol),
      );
    }
    assert.equal(ms.postprocess(pipeline, response).predictions[0].digits[0], "7");
  });

  test("bad input is an Error with the status the server answers", () => {
    assert.throws(() => ms.transform(pipeline, Buffer.from("not a picture")), (e) => e.status === 400);
    assert.throws(() => ms.transform({ request: { steps: ["nope"] } }, Buffer.alloc(1)), (e) => e.status === 400);
    assert.throws(() => ms.transformBatch(pipeline, Array(65).fill(Buffer.alloc(1))), (e) => e.status === 413);
    assert.throws(() => ms.preprocess(pipeline, "{}", "v3"), /give "v1" or "v2"/);
    assert.throws(() => ms.encodeInferRequest({ inputs: [{ name: "x", datatype: "FP32", shape: [2], data: [1] }] }),
      (e) => e.status === 400);
    assert.throws(() => ms.encodeV1Request({ not: "a list" }), (e) => e.status === 400);
  });

  test("the version is the package's", () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, "filters/web/pkg/package.json")));
    assert.equal(ms.version(), pkg.version);
  });
});

describe("encoders round-trip through the sidecar", () => {
  let sidecar;
  let base;
  let log = "";

  before(async () => {
    sidecar = spawn(meshserve, ["serve", "--model-repository", "models/repository",
      "--http-port", "0", "--grpc-port", "0"], { cwd: root, stdio: ["ignore", "ignore", "pipe"] });
    base = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no address within 30 s:\n${log}`)), 30000);
      sidecar.stderr.on("data", (chunk) => {
        log += chunk;
        const found = /listening on http=(\S+)/.exec(log);
        if (found) {
          clearTimeout(timer);
          resolve(`http://${found[1]}`);
        }
      });
      sidecar.on("exit", (code) => reject(new Error(`meshserve serve exited (${code}):\n${log}`)));
    });
    // Ready once every model has loaded.
    for (let i = 0; i < 300; i++) {
      const ready = await fetch(`${base}/v2/health/ready`).then((r) => r.ok, () => false);
      if (ready) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`not ready within 30 s:\n${log}`);
  });

  after(() => sidecar?.kill("SIGKILL"));

  async function infer(model, encoded) {
    const headers = { "content-type": encoded.contentType };
    if (encoded.headerLength !== undefined) {
      headers["inference-header-content-length"] = String(encoded.headerLength);
    }
    const res = await fetch(`${base}/v2/models/${model}/infer`, { method: "POST", body: encoded.body, headers });
    const length = res.headers.get("inference-header-content-length");
    return ms.parseInferResponse(new Uint8Array(await res.arrayBuffer()), length === null ? undefined : Number(length));
  }

  test("a picture's tensor, in JSON and in binary, asking for binary outputs too", async () => {
    const tensor = ms.transform(pipeline, fs.readFileSync(pictures[0]));
    const json = await infer("mnist_cnn", ms.encodeInferRequest({ inputs: [tensor] }));
    const binary = await infer("mnist_cnn", ms.encodeInferRequest({ inputs: [tensor] }, true));
    const binaryOut = await infer("mnist_cnn", ms.encodeInferRequest(
      { inputs: [tensor], parameters: { binary_data_output: true } }, true));
    assert.equal(json.model_name, "mnist_cnn");
    assert.deepEqual(binary.outputs, json.outputs);
    assert.deepEqual(binaryOut.outputs, json.outputs);
    const scores = json.outputs[0].data;
    assert.equal(scores.indexOf(Math.max(...scores)), 7, "the demo's photo is a 7");
  });

  test("every datatype the encoder writes in binary reads back the same", async () => {
    // identity_all echoes each in_<type> as out_<type>: UINT8 to UINT64, INT8 to INT64, FP16
    // to FP64, BOOL and BYTES.
    // Given as JSON text: JavaScript numbers cannot hold every 64-bit integer, text can.
    const text = fs.readFileSync(path.join(root, "models/reference/identity_all_v1.json"), "utf8");
    const { inputs } = JSON.parse(text);
    const sent = ms.encodeInferRequest(text, true);
    assert.ok(sent.headerLength < sent.body.length, "the data follows the JSON header");
    const out = await infer("identity_all", sent);
    assert.equal(out.outputs.length, inputs.length);
    for (const input of inputs) {
      const output = out.outputs.find((o) => o.name === input.name.replace(/^in_/, "out_"));
      assert.ok(output, `an output for ${input.name}`);
      // The server writes floats in their shortest form for their width: the same FP32 value
      // (Math.fround), and FP16 within half a unit in the last place.
      if (input.datatype === "FP32") {
        assert.deepEqual(output.data.map(Math.fround), input.data.map(Math.fround), input.name);
      } else if (input.datatype === "FP16") {
        output.data.forEach((v, i) =>
          assert.ok(Math.abs(v - input.data[i]) <= 2 ** -11 * Math.abs(input.data[i]), `${input.name}[${i}]`));
      } else {
        assert.deepEqual(output.data, input.data, input.name);
      }
      assert.deepEqual(output.shape, input.shape, input.name);
    }
  });

  test("a V1 body from bytes and numbers", async () => {
    const sample = JSON.parse(fs.readFileSync(path.join(root, "models/samples/sklearn_digits_v1_request.json")));
    const body = ms.encodeV1Request(sample.instances);
    const json = { "content-type": "application/json" };
    const res = await fetch(`${base}/v1/models/sklearn_digits:predict`, { method: "POST", body, headers: json });
    const answer = ms.parseV1Response(new Uint8Array(await res.arrayBuffer()));
    const direct = await fetch(`${base}/v1/models/sklearn_digits:predict`, { method: "POST", body: JSON.stringify(sample), headers: json });
    assert.deepEqual(answer, await direct.json());
    assert.equal(answer.predictions.length, sample.instances.length);
  });

  test("the server's errors are thrown with its message", async () => {
    await assert.rejects(infer("no_such_model", ms.encodeInferRequest({ inputs: [
      { name: "x", datatype: "FP32", shape: [1], data: [1] }] })), /no_such_model/);
  });
});
