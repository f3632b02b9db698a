// Export of an analysis (JSONL: one analysis per line; CSV: one token per line) and import of such files for
// viewing without a server. Import also reads `GET /status` bodies, bare row lists and upstream's exports.

export const FORMAT = 'talkative.analysis/1';

const LEADING_COLUMNS = ['position', 'token', 'token_id', 'explanation'];
const TRAILING_COLUMNS = [
  'norm',
  'outlier',
  'layer',
  'finish_reason',
  'all_samples_truncated',
  'explanation_parse',
  'logit_lens_top',
  'tuned_lens_top',
  'explanation_structured',
  'token_salience',
];
const JSON_CELLS = new Set(['explanation_structured', 'token_salience']);
const NUMERIC_FIELDS = ['position', 'token_id', 'norm', 'layer'];

/** The CSV columns: the row's own fields around one column per metric of the server's legend. */
export function csvColumns(legend) {
  return [...LEADING_COLUMNS, ...legend.names, ...TRAILING_COLUMNS];
}

/** Columns read and written as numbers (never quoted as formulas): the numeric fields and every metric. */
function numericColumns(legend) {
  return new Set([...NUMERIC_FIELDS, ...legend.names]);
}
const FORMULA_START = /^[=+\-@\t\r]/;

export function analysisRecord(run) {
  const record = {
    format: FORMAT,
    request_id: run.requestId || run.originalRequestId || null,
    model_id: run.modelId || run.result?.metadata?.model_id || null,
    created_at: run.createdAt || null,
    input: run.input || null,
    options: run.options || null,
    metadata: run.result?.metadata || {},
    tokens: run.result?.tokens || [],
  };
  return record;
}

export function toJsonl(runs) {
  return runs.map((run) => JSON.stringify(analysisRecord(run))).join('\n') + '\n';
}

function csvCell(value, column, numeric) {
  if (value === null || value === undefined) return '';
  let text = JSON_CELLS.has(column) || typeof value === 'object' ? JSON.stringify(value) : String(value);
  // a spreadsheet runs a cell starting with = + - @ as a formula; the quote marks it as text (OWASP)
  if (!numeric.has(column) && FORMULA_START.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) || text !== text.trim() ? `"${text.replace(/"/g, '""')}"` : text;
}

/** One token a line; `legend` (metrics.js `Legend`) names the metric columns. */
export function toCsv(rows, legend) {
  const columns = csvColumns(legend);
  const numeric = numericColumns(legend);
  const lines = [columns.join(',')];
  for (const row of rows) lines.push(columns.map((c) => csvCell(row[c], c, numeric)).join(','));
  return lines.join('\r\n') + '\r\n';
}

export function fileStem(run) {
  const id = (run.requestId || run.originalRequestId || run.id).slice(0, 8);
  const day = new Date().toISOString().slice(0, 10);
  return `talkative-${id}-${day}`;
}

// -- import -----------------------------------------------------------------------------------------------------
export class ImportError extends Error {}

function parseCsv(text) {
  const rows = [];
  let row = [];
  let cell = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        cell += '"';
        i++;
      } else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(cell);
      cell = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      row.push(cell);
      rows.push(row);
      row = [];
      cell = '';
    } else cell += c;
  }
  if (cell !== '' || row.length) {
    row.push(cell);
    rows.push(row);
  }
  return rows;
}

function csvValue(column, raw, numeric) {
  if (raw === '') return column === 'token' || column === 'explanation' ? '' : null;
  if (numeric.has(column)) {
    const n = Number(raw);
    return Number.isFinite(n) ? n : null;
  }
  if (column === 'outlier' || column === 'all_samples_truncated') return raw === 'true';
  if (JSON_CELLS.has(column)) {
    try {
      return JSON.parse(raw);
    } catch {
      return null;
    }
  }
  return raw.startsWith("'") && FORMULA_START.test(raw.slice(1)) ? raw.slice(1) : raw;
}

function fromCsv(text, numeric) {
  const table = parseCsv(text).filter((r) => r.length > 1 || r[0] !== '');
  const header = table.shift() || [];
  if (!header.includes('token')) throw new ImportError('This CSV has no “token” column.');
  const rows = table.map((cells, i) => {
    const row = {};
    header.forEach((column, j) => (row[column] = csvValue(column, cells[j] ?? '', numeric)));
    if (row.position === null || row.position === undefined) row.position = i;
    return row;
  });
  return [{ tokens: rows, metadata: {} }];
}

const isRow = (x) => x && typeof x === 'object' && !Array.isArray(x) && typeof x.token === 'string';

/** Upstream exports may be column-oriented: {token: [...], explanation: [...], ...}. */
function columnsToRows(data) {
  const keys = Object.keys(data);
  const n = Array.isArray(data.token) ? data.token.length : 0;
  return Array.from({ length: n }, (_, i) => Object.fromEntries(keys.map((k) => [k, data[k]?.[i] ?? null])));
}

function analysesOf(item) {
  if (Array.isArray(item)) {
    if (item.every(isRow)) return [{ tokens: item }];
    return item.flatMap(analysesOf);
  }
  if (!item || typeof item !== 'object') return [];
  if (Array.isArray(item.tokens)) return [item];
  if (item.result && Array.isArray(item.result.tokens)) {
    return [{ ...item.result, request_id: item.request_id, model_id: item.model_id, created_at: item.created_at }];
  }
  if (Array.isArray(item.data)) return [{ tokens: item.data, metadata: item.metadata || {} }];
  if (item.data && typeof item.data === 'object' && Array.isArray(item.data.token)) {
    return [{ tokens: columnsToRows(item.data), metadata: item.metadata || {} }];
  }
  return [];
}

function normalise(analysis) {
  const tokens = analysis.tokens.filter(isRow).map((row, i) => ({
    ...row,
    position: Number.isInteger(row.position) ? row.position : i,
  }));
  return { ...analysis, tokens, metadata: analysis.metadata || {} };
}

/** Every analysis in a file's text; throws ImportError with a reason when there is none. */
export function parseAnalyses(text, filename, legend) {
  const trimmed = text.replace(/^\uFEFF/, '').trim();
  if (!trimmed) throw new ImportError('The file is empty.');
  let found = [];
  if (/\.csv$/i.test(filename) || /^"?position"?,/.test(trimmed) || /^"?token"?,/.test(trimmed)) {
    found = fromCsv(trimmed, numericColumns(legend));
  } else {
    let whole;
    try {
      whole = JSON.parse(trimmed);
    } catch {
      whole = undefined;
    }
    if (whole !== undefined) found = analysesOf(whole);
    else {
      const lines = trimmed.split(/\r?\n/).filter((l) => l.trim());
      const items = lines.map((line, i) => {
        try {
          return JSON.parse(line);
        } catch {
          throw new ImportError(`Line ${i + 1} is not valid JSON.`);
        }
      });
      const rows = items.filter(isRow);
      found = rows.length === items.length ? [{ tokens: rows }] : items.flatMap(analysesOf);
    }
  }
  found = found.map(normalise).filter((a) => a.tokens.length);
  if (!found.length) {
    throw new ImportError(
      'No analysis found. Expected a JSONL or CSV file exported here, or a JSON body of GET /status/{id}.',
    );
  }
  return found;
}
