// The analysed text as a strip of tokens coloured by the chosen metric. A listbox: arrow keys move between
// tokens (the selection follows, and the detail panel with it), hovering or focusing shows the tooltip.
import { h } from '../dom.js';
import { num, shownToken, spokenToken } from '../format.js';
import { badnessColour } from '../metrics.js';
import { flagsOf, flagWords } from './flags.js';

export function createStrip({ rows, legend, tooltip, onSelect }) {
  let scale = null;
  let metric = null;
  let salienceMax = 1;
  let selected = -1;
  const strip = h('div', { class: 'strip', role: 'listbox', 'aria-label': 'Tokens of the text', 'aria-orientation': 'horizontal' });
  const tokens = rows.map((row, i) => {
    const flags = flagsOf(row);
    const el = h(
      'span',
      { class: `tok${row.outlier ? ' outlier' : ''}${flags.length ? ' flagged' : ''}`, role: 'option', tabindex: i === 0 ? '0' : '-1', id: `tok-${i}`, 'data-i': i, 'data-flags': flags.length ? flags.join(' ') : undefined },
      shownToken(row.token),
    );
    strip.append(el);
    if (row.token.includes('\n')) strip.append(h('br', { 'aria-hidden': 'true' }));
    return el;
  });

  function label(i) {
    const row = rows[i];
    const parts = [`Token ${i + 1} of ${rows.length}: ${spokenToken(row.token)}.`];
    if (metric) parts.push(`${legend.get(metric).label} ${num(row[metric])}.`);
    if (flagsOf(row).length) parts.push(`Flagged: ${flagWords(row)}.`);
    parts.push(`Explanation: ${row.explanation ?? 'none'}`);
    return parts.join(' ');
  }

  function recolour(nextMetric, nextScale, nextSalienceMax) {
    metric = nextMetric;
    scale = nextScale;
    salienceMax = nextSalienceMax;
    strip.setAttribute('aria-label', `Tokens of the text${metric ? `, coloured by ${legend.get(metric).label}` : ''}`);
    tokens.forEach((el, i) => {
      const row = rows[i];
      const colour = !row.outlier && scale ? badnessColour(scale.badness(row[metric])) : null;
      el.style.backgroundColor = colour || '';
      el.setAttribute('aria-label', label(i));
    });
  }

  function select(i, { focus = false } = {}) {
    if (i < 0 || i >= tokens.length) return;
    if (selected >= 0) {
      tokens[selected].setAttribute('aria-selected', 'false');
      tokens[selected].tabIndex = -1;
    } else tokens[0].tabIndex = -1;
    selected = i;
    tokens[i].setAttribute('aria-selected', 'true');
    tokens[i].tabIndex = 0;
    if (focus) {
      tokens[i].focus();
      tokens[i].scrollIntoView({ block: 'nearest', inline: 'nearest' });
    }
  }

  const tipFor = (el) => tooltip.show(el, rows[Number(el.dataset.i)], { metric, salienceMax, legend });

  strip.addEventListener('mouseover', (event) => {
    const el = event.target.closest('.tok');
    if (el) tipFor(el);
  });
  strip.addEventListener('mouseout', (event) => {
    if (event.target.closest('.tok') && !event.relatedTarget?.closest?.('.tok')) tooltip.hideSoon();
  });
  strip.addEventListener('focusin', (event) => {
    const el = event.target.closest('.tok');
    if (!el) return;
    if (Number(el.dataset.i) !== selected) onSelect(Number(el.dataset.i)); // the selection follows focus
    tipFor(el);
  });
  strip.addEventListener('focusout', () => tooltip.hideSoon());
  strip.addEventListener('click', (event) => {
    const el = event.target.closest('.tok');
    if (el) onSelect(Number(el.dataset.i), { focus: true });
  });
  strip.addEventListener('keydown', (event) => {
    const i = selected >= 0 ? selected : 0;
    const moves = {
      ArrowRight: i + 1,
      ArrowDown: i + 1,
      ArrowLeft: i - 1,
      ArrowUp: i - 1,
      PageDown: i + 10,
      PageUp: i - 10,
      Home: 0,
      End: tokens.length - 1,
    };
    if (event.key in moves) {
      event.preventDefault();
      onSelect(Math.max(0, Math.min(tokens.length - 1, moves[event.key])), { focus: true });
    } else if (event.key === 'Escape') tooltip.hide();
  });

  /** Hide the tokens a filter leaves out (`hides(row)`); the others keep their places and their selection. */
  function filter(hides) {
    tokens.forEach((el, i) => {
      el.hidden = hides(rows[i]);
    });
  }

  /** Mark the tokens a share points at (row positions) and show the first of them. */
  function anchor(positions) {
    const wanted = new Set(positions);
    tokens.forEach((el, i) => el.classList.toggle('anchored', wanted.has(rows[i].position)));
  }

  return { element: strip, recolour, select, filter, anchor };
}
