// The Generate section: continue a text or a chat, watch the tokens arrive, then analyse a completion.
import { h, clear, fill } from '../dom.js';
import { load, save } from '../prefs.js';
import { createChatEditor } from './chat-editor.js';
import { createModelPicker } from './model-picker.js';
import { FieldError, ctrlEnter, formError, modeSwitch, numberOf } from './form-utils.js';

const $id = (id) => document.getElementById(id);
const FINISH = { stop: 'ended its turn', length: 'reached the token limit' };

export function createGenerate({ store, generations, onAnalyse }) {
  const form = $id('generate-form');
  const text = $id('generate-text');
  const stop = $id('generate-stop');
  const run = $id('generate-run');
  const status = $id('generate-status');
  const list = $id('generate-completions');
  const announce = $id('generate-announce');
  const errors = formError(form);
  const mode = modeSwitch(form, 'generate-mode', (m) => save('generate.mode', m));
  const chat = createChatEditor($id('generate-chat'), { name: 'generate', onChange: (m) => save('generate.messages', m) });
  createModelPicker({ select: $id('generate-model'), info: $id('generate-model-info'), store });
  text.value = load('generate.text', '');
  chat.set(load('generate.messages', []));
  mode.set(load('generate.mode', 'text'));
  text.addEventListener('input', () => save('generate.text', text.value));

  const num = (id, opts) => numberOf($id(id), opts);

  function submit() {
    errors.clear();
    try {
      let input;
      if (mode.get() === 'text') {
        if (!text.value) throw new FieldError(text, 'Enter a prompt to continue.');
        input = { text: text.value };
      } else {
        const messages = chat.get();
        const empty = messages.findIndex((m) => !m.content.trim());
        if (empty >= 0) throw new FieldError(form.querySelectorAll('#generate-chat textarea')[empty], `Message ${empty + 1} is empty.`);
        input = { messages };
      }
      const options = {
        max_new_tokens: num('gen-tokens', { integer: true }),
        num_completions: num('gen-completions', { integer: true }),
        temperature: num('gen-temperature'),
        top_p: num('gen-top-p'),
        seed: num('gen-seed', { integer: true }),
      };
      generations.start({ input, modelId: store.get('modelId'), options });
    } catch (err) {
      if (err instanceof FieldError) errors.show(err);
      else throw err;
    }
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });
  ctrlEnter(form, submit);
  stop.addEventListener('click', () => generations.cancel(generations.current()));

  function promptText(input) {
    if (input.text !== undefined) return input.text;
    return input.messages.map((m) => `${m.role}: ${m.content}`).join('\n');
  }

  /** The input an analysis of completion i gets: the prompt with the completion appended (text), or the chat
   * with the completion as the assistant's reply. */
  function analysisInput(gen, i) {
    const completion = gen.completions[i].text;
    if (gen.input.text !== undefined) return { text: gen.input.text + completion };
    const messages = gen.input.messages.map((m) => ({ ...m }));
    const last = messages[messages.length - 1];
    if (last && last.role === 'assistant') last.content += completion;
    else messages.push({ role: 'assistant', content: completion });
    return { messages };
  }

  let builtFor = null;

  function statusText(gen) {
    switch (gen.status) {
      case 'sending':
        return 'Sending…';
      case 'queued':
        return gen.queuePosition ? `Waiting in the queue: position ${gen.queuePosition}.` : 'Waiting in the queue.';
      case 'processing':
        return 'Generating…';
      case 'completed':
        return `Done: ${gen.completions.length === 1 ? 'one completion' : `${gen.completions.length} completions`}.`;
      case 'cancelled':
        return 'Stopped.';
      default:
        return '';
    }
  }

  function render() {
    const gen = generations.current();
    if (!gen) return;
    const busy = !['completed', 'failed', 'cancelled'].includes(gen.status);
    stop.hidden = !busy;
    run.disabled = busy;
    if (gen.status === 'failed') {
      fill(status, h('div', { class: 'alert error', role: 'alert' }, h('strong', {}, 'Generation failed. '), gen.error));
    } else {
      fill(status, h('p', { class: `gen-status ${gen.status}` }, statusText(gen)));
    }
    if (['completed', 'cancelled', 'failed'].includes(gen.status)) announce.textContent = statusText(gen) || gen.error;
    if (builtFor !== gen.id || list.children.length !== gen.completions.length) {
      builtFor = gen.id;
      clear(list);
      const prompt = promptText(gen.input);
      gen.completions.forEach((_, i) => {
        list.append(
          h(
            'article',
            { class: 'card completion', 'aria-labelledby': `completion-${i}-title` },
            h('div', { class: 'card-head' }, h('h3', { id: `completion-${i}-title` }, `Completion ${i + 1}`), h('span', { class: 'finish hint' })),
            h('p', { class: 'completion-text' }, h('span', { class: 'prompt' }, prompt.length > 300 ? `…${prompt.slice(-300)}` : prompt), h('span', { class: 'generated' })),
            h(
              'div',
              { class: 'actions' },
              h('button', { type: 'button', class: 'primary small analyse-this', onclick: () => onAnalyse(analysisInput(gen, i)) }, 'Analyse this'),
              h('button', { type: 'button', class: 'secondary small', onclick: () => usePrompt(analysisInput(gen, i)) }, 'Use as prompt'),
            ),
          ),
        );
      });
    }
    gen.completions.forEach((c, i) => {
      const card = list.children[i];
      card.querySelector('.generated').textContent = c.text;
      card.querySelector('.finish').textContent = c.finish ? FINISH[c.finish] || c.finish : busy ? 'generating…' : '';
      card.classList.toggle('streaming', busy);
      for (const b of card.querySelectorAll('.actions button')) b.disabled = busy || !c.text;
    });
  }

  function usePrompt(input) {
    if (input.messages) {
      chat.set(input.messages);
      mode.set('chat');
    } else {
      text.value = input.text;
      save('generate.text', text.value);
      mode.set('text');
    }
    text.focus();
  }

  store.on('generation', render);
}
