#!/usr/bin/env node
// Validates an AsyncAPI document with the official parser (@asyncapi/parser, pinned in package.json).
//
//   node .ci/asyncapi/validate.mjs [--strict] docs/asyncapi.yaml
//
// The document is read from its file, so relative $refs (the payload JSON Schemas in
// edge_agent/agent/schemas/) are resolved and their contents validated with it. Every diagnostic of
// severity error or warning is printed (file:line:col, rule, message, JSON path). Exit status: 0 valid,
// 1 errors (or warnings with --strict), 2 bad usage or a crash of the parser.
import { resolve } from 'node:path';
import { Parser, fromFile, DiagnosticSeverity } from '@asyncapi/parser';

const args = process.argv.slice(2);
const strict = args.includes('--strict');
const files = args.filter((a) => a !== '--strict');
if (files.length !== 1 || files[0].startsWith('-')) {
  console.error('usage: node validate.mjs [--strict] ASYNCAPI_FILE');
  process.exit(2);
}
const file = resolve(files[0]);

const names = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

let output;
try {
  const parser = new Parser();
  output = await fromFile(parser, file).parse({
    applyTraits: true,
    parseSchemas: true,
    // Errors only would hide warnings; info and hints (e.g. "add contact info") are not printed.
    validateOptions: { allowedSeverity: { error: false, warning: true, info: true, hint: true } },
  });
} catch (err) {
  console.error(`${file}: the parser failed: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
}

let errors = 0;
let warnings = 0;
for (const d of output.diagnostics) {
  if (d.severity !== DiagnosticSeverity.Error && d.severity !== DiagnosticSeverity.Warning) continue;
  if (d.severity === DiagnosticSeverity.Error) errors += 1;
  else warnings += 1;
  const where = d.source || file;
  const line = d.range ? d.range.start.line + 1 : 0;
  const col = d.range ? d.range.start.character + 1 : 0;
  const path = Array.isArray(d.path) && d.path.length ? ` at ${d.path.join('.')}` : '';
  console.log(`${where}:${line}:${col} ${names[d.severity]} ${d.code}: ${d.message}${path}`);
}
if (output.document === undefined && errors === 0) {
  console.log(`${file}: the parser returned no document`);
  errors += 1;
}

const version = output.document ? output.document.version() : 'unknown';
const summary = `${file}: AsyncAPI ${version}, ${errors} error(s), ${warnings} warning(s)`;
if (errors > 0 || (strict && warnings > 0)) {
  console.log(`${summary}: INVALID`);
  process.exit(1);
}
const channels = output.document.channels().length;
const operations = output.document.operations().length;
const messages = output.document.allMessages().length;
console.log(`${summary}: valid (${channels} channels, ${operations} operations, ${messages} messages)`);
