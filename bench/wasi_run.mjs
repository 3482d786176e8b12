// Runs a wasm32-wasip1 command module under Node.js's WASI (V8, as in Envoy), with the current
// directory preopened: node --no-warnings bench/wasi_run.mjs MODULE.wasm [ARGS...]
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import { argv } from "node:process";

const wasi = new WASI({ version: "preview1", args: argv.slice(2), preopens: { ".": "." } });
const module = await WebAssembly.compile(await readFile(argv[2]));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
wasi.start(instance);
