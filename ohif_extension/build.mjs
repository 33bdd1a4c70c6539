// Bundles the extension and the mode (React's createElement and Component included: OHIF
// exposes no React to run-time plugins) into two ES modules, by default into
// ../build/ohif/orthanc-cbir-ohif/ (`orthanc-cbir viewer` serves them). Run by `make ohif`.
import { build } from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = process.argv[2] ?? path.join(here, '..', 'build', 'ohif', 'orthanc-cbir-ohif');

await build({
  entryPoints: { extension: path.join(here, 'src', 'index.js'), mode: path.join(here, 'src', 'mode.js') },
  outdir,
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: true,
  sourcemap: false,
  legalComments: 'eof',
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'warning',
});
console.log(`built ${outdir}`);
