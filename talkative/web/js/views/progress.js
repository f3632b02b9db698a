// The active analysis while it waits or runs: queue position, positions done of total with the ETA, Cancel.
// After it ends: why it failed, or that it was cancelled.
import { h, fill } from '../dom.js';
import { duration, plural } from '../format.js';

export function createProgress({ store, analyses }) {
  const card = document.getElementById('progress');
  let ticker = null;

  function eta(progress) {
    if (!progress || progress.eta_seconds === null || progress.eta_seconds === undefined) return null;
    return Math.max(0, progress.eta_seconds - (Date.now() - progress.at) / 1000);
  }

  function line(run) {
    const p = run.progress;
    if (run.status === 'sending') return { text: 'Sending to the server…' };
    if (run.status === 'queued') {
      const size = store.get('queue')?.queue_size ?? run.queueSize; // the live size, not the one at submission
      if (run.queuePosition) {
        return { text: `Waiting in the queue: position ${run.queuePosition}${size ? ` of ${size}` : ''}.` };
      }
      return { text: 'Waiting in the queue.' };
    }
    if (run.status === 'processing') {
      if (!p || p.stage === 'preparing' || !p.total_positions) {
        return { text: 'Preparing: reading the activations of the text…', indeterminate: true };
      }
      const left = eta(p);
      const done = p.done_positions || 0;
      return {
        text: `Explaining: ${done} of ${plural(p.total_positions, 'position')} done${left !== null ? `, about ${duration(left)} left` : ''}.`,
        value: done,
        max: p.total_positions,
      };
    }
    return null;
  }

  function render() {
    const run = analyses.active();
    clearInterval(ticker);
    ticker = null;
    if (!run || run.status === 'completed') {
      card.hidden = true;
      return;
    }
    card.hidden = false;
    card.dataset.status = run.status;
    const title = h('h2', { id: 'progress-title', class: 'sr-only' }, 'Progress');
    if (run.status === 'failed') {
      card.dataset.run = '';
      fill(card, 
        title,
        h('div', { class: 'alert error', role: 'alert' }, h('strong', {}, 'The analysis failed. '), run.error || ''),
      );
      return;
    }
    if (run.status === 'cancelled') {
      card.dataset.run = '';
      const why = run.error && !/^cancell?ed( by user)?\.?$/i.test(run.error) ? ` (${run.error})` : '';
      fill(card, title, h('p', { class: 'alert info', role: 'status' }, `Cancelled${why}. Nothing was kept.`));
      return;
    }
    const info = line(run);
    if (card.dataset.run !== run.id || !card.querySelector('#cancel-run')) {
      // built once per run, then updated in place, so keyboard focus stays on Cancel
      card.dataset.run = run.id;
      const cancel = h('button', { type: 'button', class: 'secondary', id: 'cancel-run', onclick: () => analyses.cancel(analyses.active()) }, 'Cancel');
      fill(card, 
        title,
        h('div', { class: 'progress-row' }, h('p', { id: 'progress-text', class: 'progress-text' }), cancel),
        h('progress', { 'aria-labelledby': 'progress-text' }),
      );
    }
    card.querySelector('#progress-text').textContent = info.text;
    const bar = card.querySelector('progress');
    if (info.max) {
      bar.max = info.max;
      bar.value = info.value;
    } else bar.removeAttribute('value');
    if (run.status === 'processing' && eta(run.progress) !== null) {
      ticker = setInterval(() => {
        const text = card.querySelector('#progress-text');
        if (text) text.textContent = line(run).text;
      }, 1000);
    }
  }

  store.on('runs', (_, run) => (!run || run.id === store.get('activeRun') ? render() : null));
  store.on('activeRun', render);
  store.on('queue', () => analyses.active()?.status === 'queued' && render());
}
