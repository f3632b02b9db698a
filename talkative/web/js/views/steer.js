// "Steer and re-explain" on the detail panel: a direction in words and an alpha slider. As either changes
// (debounced), the selected token's activation is pushed by alpha · ‖A‖ · unit(direction) and explained again by
// the server (`POST /api/v1/describe` with `options.steer`), so one can watch an explanation move towards a
// concept. The activation comes from the row (return_vectors) or, once per token, from `POST /api/v1/extract`.
import { h, fill } from '../dom.js';
import { num } from '../format.js';
import { metricValue } from './explanation.js';

const DEBOUNCE_MS = 350;
export const MAX_ALPHA = 10;

export function createSteer({ legend, reexplain }) {
  let row = null;
  let timer = null;
  let sequence = 0; // answers to older requests are dropped: only the latest slider position is shown

  const direction = h('input', {
    id: 'steer-direction',
    type: 'text',
    maxlength: 2000,
    placeholder: 'e.g. the ocean',
    autocomplete: 'off',
    'aria-describedby': 'steer-hint',
  });
  const alphaValue = h('output', { id: 'steer-alpha-value', for: 'steer-alpha' }, '0');
  const alpha = h('input', { id: 'steer-alpha', type: 'range', min: -MAX_ALPHA, max: MAX_ALPHA, step: 0.1, value: 0 });
  const result = h('div', { id: 'steer-result', class: 'steer-result', 'aria-live': 'polite' });
  const element = h(
    'section',
    { class: 'steer', 'aria-labelledby': 'steer-title' },
    h('h4', { id: 'steer-title' }, 'Steer and re-explain'),
    h(
      'p',
      { class: 'hint', id: 'steer-hint' },
      'Push this token’s activation along the direction the reconstructor gives these words (alpha times its own norm), and explain it again.',
    ),
    h('label', { for: 'steer-direction' }, 'Direction (words)'),
    direction,
    h('label', { for: 'steer-alpha' }, 'Alpha ', alphaValue),
    alpha,
    result,
  );

  function schedule() {
    alphaValue.textContent = Number(alpha.value).toFixed(1);
    clearTimeout(timer);
    timer = setTimeout(run, DEBOUNCE_MS);
  }

  async function run() {
    const words = direction.value.trim();
    const a = Number(alpha.value);
    const mine = ++sequence;
    if (!row || !words) {
      fill(result, words ? null : h('p', { class: 'hint' }, 'Write a direction to steer along.'));
      return;
    }
    if (!reexplain) {
      fill(result, h('p', { class: 'hint' }, 'Re-explaining needs the server this result came from.'));
      return;
    }
    result.setAttribute('aria-busy', 'true');
    fill(result, h('p', { class: 'hint' }, `Explaining with alpha ${a.toFixed(1)}…`));
    try {
      const answer = await reexplain(row, { text: words }, a);
      if (mine !== sequence) return;
      show(answer, a);
    } catch (err) {
      if (mine !== sequence) return;
      fill(result, h('p', { class: 'error', role: 'alert' }, err.message || String(err)));
    } finally {
      if (mine === sequence) result.removeAttribute('aria-busy');
    }
  }

  function show(answer, a) {
    const metrics = legend.metrics.filter((m) => answer[m.name] !== null && answer[m.name] !== undefined);
    fill(
      result,
      h('p', { class: 'detail-sub' }, `Steered by alpha ${a.toFixed(1)} towards “${direction.value.trim()}”`),
      h('p', { class: 'detail-explanation steer-explanation' }, answer.explanation),
      h(
        'dl',
        { class: 'detail-metrics steer-metrics' },
        metrics.map((m) => h('div', {}, h('dt', {}, m.label, h('span', { class: 'direction' }, ` ${m.better} is better`)), h('dd', {}, metricValue(m, answer[m.name])))),
        answer.norm !== undefined ? h('div', {}, h('dt', {}, 'Norm', h('span', { class: 'direction' }, ' of the steered activation')), h('dd', {}, num(answer.norm))) : null,
      ),
    );
  }

  direction.addEventListener('input', schedule);
  alpha.addEventListener('input', schedule);

  /** A new token is selected: keep the direction and alpha, explain the new token when a direction is set. */
  function select(next) {
    row = next;
    clearTimeout(timer);
    sequence++;
    fill(result);
    if (row && direction.value.trim()) timer = setTimeout(run, DEBOUNCE_MS);
  }

  return { element, select };
}
