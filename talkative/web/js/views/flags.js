// Row flags: what each one means, marks on the flagged tokens, and a filter that shows or hides the tokens that
// carry each flag (the server defines them: docs/engine.md, "Row flags").
import { h } from '../dom.js';

export const FLAG_TEXT = {
  early_position: 'early position: too little context before it',
  bos: 'beginning-of-sequence token',
  system_prompt: 'part of the system prompt',
  outlier: 'norm outlier (an attention sink)',
  low_confidence: 'low confidence: the reconstruction is no better than the mean',
  degenerate: 'degenerate explanation: heavy repetition, or not in the usual script',
  truncated: 'explanation cut at its token budget',
};

export const flagsOf = (row) => row.flags || [];

/** The words a screen reader and a tooltip give for a row's flags ('' without any). */
export function flagWords(row) {
  return flagsOf(row)
    .map((f) => FLAG_TEXT[f] || f)
    .join('; ');
}

/**
 * One checkbox per flag the rows carry ("show tokens flagged …", all on at first); `onChange` is called when one
 * changes, and `hides(row)` says whether a row is filtered out. No element when no row is flagged.
 */
export function createFlagFilter(rows, onChange) {
  const counts = new Map();
  rows.forEach((r) => flagsOf(r).forEach((f) => counts.set(f, (counts.get(f) || 0) + 1)));
  const hidden = new Set();
  const hides = (row) => flagsOf(row).some((f) => hidden.has(f));
  if (!counts.size) return { element: null, hides };
  const element = h(
    'fieldset',
    { class: 'flag-filter', id: 'flag-filter' },
    h('legend', {}, 'Show flagged tokens'),
    [...counts].map(([flag, n]) =>
      h(
        'label',
        { title: FLAG_TEXT[flag] || flag },
        h('input', {
          type: 'checkbox',
          checked: true,
          'data-flag': flag,
          onchange: (event) => {
            if (event.target.checked) hidden.delete(flag);
            else hidden.add(flag);
            onChange();
          },
        }),
        ` ${flag.replace('_', ' ')} (${n})`,
      ),
    ),
  );
  return { element, hides };
}
