// The transformer's pre-processing in @meshserve/web (Node's V8), timed on a picture, for a
// wasm-in-the-client against native figure beside filters/core/examples/pipeline_timing.rs
// (the same pipeline, natively, on a V1 body of the same picture):
//
//   bash scripts/build-web.sh
//   node bench/web_transform.mjs models/samples/digit_photo.jpg [RUNS]
//
// Prints the median and the minimum of RUNS (default 50) calls of transform(), after 5
// warm-up calls. The pipeline is the demo's mnist transformer.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const ms = createRequire(import.meta.url)(path.join(root, "filters/web/pkg/node/meshserve_web.js"));
const [file, runsArg] = process.argv.slice(2);
if (!file) {
  console.error("usage: node bench/web_transform.mjs PICTURE [RUNS]");
  process.exit(2);
}
const runs = Number(runsArg || 50);
const picture = fs.readFileSync(file);
const pipeline = {
  request: {
    field: "image",
    steps: ["base64_decode", "image_decode", { color: "grayscale" },
      { resize: { width: 28, height: 28, method: "area", fit: "crop" } },
      "invert", { scale: 0.00392156862745098 }, { layout: "nchw" }, { emit: { input: "input" } }],
  },
};
const times = [];
for (let i = 0; i < runs + 5; i++) {
  const start = process.hrtime.bigint();
  ms.transform(pipeline, picture);
  const elapsed = Number(process.hrtime.bigint() - start) / 1e6;
  if (i >= 5) times.push(elapsed);
}
times.sort((a, b) => a - b);
console.log(`${runs} runs: median ${times[times.length >> 1].toFixed(3)} ms, min ${times[0].toFixed(3)} ms`);
