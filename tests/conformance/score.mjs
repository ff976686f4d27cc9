// Scores a cache-tests results file the way cache-tests.fyi classifies results, and compares
// it test by test with a reference results file.
//
//   node score.mjs SUITE_DIR RESULTS.json [REFERENCE.json]
//
// Prints one JSON object: counts per class for required tests, the required tests that fail,
// and the tests the reference passes that these results do not.

import path from 'path'
import fs from 'fs'
import { pathToFileURL } from 'url'

const [suiteDir, resultsFile, referenceFile] = process.argv.slice(2)
const suites = (await import(pathToFileURL(path.join(suiteDir, 'tests', 'index.mjs')))).default
const tests = new Map()
for (const suite of suites) {
  for (const test of suite.tests) tests.set(test.id, { ...test, suite: suite.id })
}

function classify (results, id) {
  const test = tests.get(id)
  const result = results[id]
  if (result === undefined) return 'untested'
  for (const dependency of test.depends_on || []) {
    if (!['pass', 'yes'].includes(classify(results, dependency))) return 'dependency_fail'
  }
  if (Array.isArray(result) && result[0] === 'Setup') {
    return result[1] === 'retry' ? 'retry' : 'setup_fail'
  }
  const kind = test.kind || 'required'
  if (kind === 'required') return result === true ? 'pass' : 'fail'
  if (kind === 'optimal') return result === true ? 'pass' : 'optional_fail'
  return result === true ? 'yes' : 'no'
}

const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
const reference = referenceFile ? JSON.parse(fs.readFileSync(referenceFile, 'utf8')) : null
const summary = { required: {}, optimal: {}, check: {}, failed: [], worse_than_reference: [] }
for (const [id, test] of tests) {
  if (test.browser_only) continue
  const kind = test.kind || 'required'
  const cls = classify(results, id)
  summary[kind][cls] = (summary[kind][cls] || 0) + 1
  if (kind === 'required' && cls === 'fail') summary.failed.push(`${test.suite}/${id}`)
  if (reference && kind !== 'check' && classify(reference, id) === 'pass' && cls !== 'pass') {
    summary.worse_than_reference.push(`${test.suite}/${id}: ${JSON.stringify(results[id])}`)
  }
}
console.log(JSON.stringify(summary, null, 2))
