// This session's analyses as a row of chips: status at a glance, click to show one, × to put a finished one away.
import { h, fill } from '../dom.js';
import { isTerminal } from '../analyses.js';

const ICONS = { sending: '…', queued: '◷', processing: '◐', completed: '✓', failed: '!', cancelled: '–' };
const WORDS = { sending: 'sending', queued: 'queued', processing: 'running', completed: 'done', failed: 'failed', cancelled: 'cancelled' };

function short(text, n = 28) {
  const t = (text || '').replace(/\s+/g, ' ').trim();
  return t.length > n ? `${t.slice(0, n - 1)}…` : t || '(empty)';
}

export function createRunsBar({ store, analyses }) {
  const bar = document.getElementById('runs-bar');

  function render() {
    const runs = [...analyses.runs.values()];
    bar.hidden = runs.length < 2;
    if (bar.hidden) return;
    const active = store.get('activeRun');
    fill(bar, 
      h('span', { class: 'runs-title', id: 'runs-title' }, 'This session'),
      h(
        'ul',
        { 'aria-labelledby': 'runs-title' },
        runs.map((run) => {
          const label = `${short(run.label)} (${WORDS[run.status]}${run.origin === 'imported' ? ', from a file' : ''})`;
          return h(
            'li',
            { class: `chip status-${run.status}${run.id === active ? ' active' : ''}` },
            h(
              'button',
              { type: 'button', class: 'chip-main', 'aria-pressed': String(run.id === active), 'aria-label': label, title: label, onclick: () => analyses.activate(run.id) },
              h('span', { class: 'chip-icon', 'aria-hidden': 'true' }, ICONS[run.status]),
              short(run.label),
            ),
            isTerminal(run)
              ? h('button', { type: 'button', class: 'chip-close', 'aria-label': `Close ${short(run.label)}`, onclick: () => analyses.remove(run.id) }, '×')
              : null,
          );
        }),
      ),
    );
  }

  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      render();
    });
  };
  store.on('runs', (_, run) => (!run || !run.progress || run.status !== 'processing' ? schedule() : null));
  store.on('activeRun', schedule);
}
