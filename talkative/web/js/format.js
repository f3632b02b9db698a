// Numbers, times and tokens as people read them.

export function num(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '—';
  const a = Math.abs(value);
  if (a !== 0 && (a >= 1e5 || a < 10 ** -digits)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '';
  if (seconds < 1) return 'under a second';
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  return s ? `${m} min ${s} s` : `${m} min`;
}

export function when(iso) {
  if (!iso) return '';
  const t = new Date(iso);
  const ago = (Date.now() - t.getTime()) / 1000;
  if (ago < 45) return 'just now';
  if (ago < 3600) return `${Math.round(ago / 60)} min ago`;
  if (ago < 86400) return `${Math.round(ago / 3600)} h ago`;
  return t.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

export function exactTime(iso) {
  return iso ? new Date(iso).toLocaleString() : '';
}

/** A token as shown on screen: whitespace that would vanish is drawn (↵ newline, ⇥ tab). */
export function shownToken(token) {
  if (token === '') return '∅';
  return String(token).replace(/\r/g, '␍').replace(/\n/g, '↵').replace(/\t/g, '⇥');
}

/** A token as read aloud: leading spaces and line breaks named, since a screen reader skips them. */
export function spokenToken(token) {
  const t = String(token);
  if (t.trim() === '') {
    if (t.includes('\n')) return 'line break';
    return t.length ? 'space' : 'empty token';
  }
  return (t.startsWith(' ') ? 'space + ' : '') + t.trim();
}

const ESCAPES = { n: '\n', t: '\t', r: '\r', '\\': '\\', "'": "'", '"': '"' };

/**
 * The engine writes lens tops as Python reprs of the top tokens separated by spaces (`' the' ',' "it's"`).
 * Returns the tokens as strings; a list is passed through.
 */
export function lensTokens(value) {
  if (Array.isArray(value)) return value.map(String);
  if (typeof value !== 'string' || !value) return [];
  const out = [];
  const re = /'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(value)) !== null) {
    const body = m[1] ?? m[2];
    out.push(
      body.replace(/\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)/g, (_, e) => {
        if (e[0] === 'x' || e[0] === 'u' || e[0] === 'U') return String.fromCodePoint(parseInt(e.slice(1), 16));
        return ESCAPES[e] ?? e;
      }),
    );
  }
  return out.length ? out : [value];
}

export function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}
