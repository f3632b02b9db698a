// The analysis form: text or chat messages, model, options (advanced ones folded away), Ctrl+Enter to run.
// The draft and the options are remembered in the browser.
import { load, save } from '../prefs.js';
import { createChatEditor } from './chat-editor.js';
import { createModelPicker } from './model-picker.js';
import { FieldError, ctrlEnter, formError, modeSwitch, numberOf } from './form-utils.js';

const $id = (id) => document.getElementById(id);

export function createAnalyseForm({ store, onSubmit }) {
  const form = $id('analyse-form');
  const text = $id('analyse-text');
  const errors = formError(form);
  const fields = {
    k: $id('opt-k'),
    temperature: $id('opt-temperature'),
    seed: $id('opt-seed'),
    salience: $id('opt-salience'),
    kl: $id('opt-kl'),
    lens: $id('opt-lens'),
    batch: $id('opt-batch'),
    lastN: $id('opt-last-n'),
    add: $id('opt-add'),
    left: $id('opt-left'),
    right: $id('opt-right'),
    hard: $id('opt-hard'),
    vectors: $id('opt-vectors'),
  };

  const mode = modeSwitch(form, 'analyse-mode', (m) => save('analyse.mode', m));
  const chat = createChatEditor($id('analyse-chat'), {
    name: 'analyse',
    onChange: (messages) => save('analyse.messages', messages),
  });
  createModelPicker({ select: $id('analyse-model'), info: $id('analyse-model-info'), store });

  // remembered draft and options
  text.value = load('analyse.text', '');
  chat.set(load('analyse.messages', []));
  mode.set(load('analyse.mode', 'text'));
  const stored = load('analyse.fields', {});
  for (const [name, el] of Object.entries(fields)) {
    if (!(name in stored)) continue;
    if (el.type === 'checkbox') el.checked = Boolean(stored[name]);
    else el.value = stored[name];
  }
  // advanced options left set from an earlier visit are shown, not silently applied
  const advanced = ['batch', 'lastN', 'add', 'left', 'right', 'hard', 'vectors'];
  if (advanced.some((n) => (fields[n].type === 'checkbox' ? fields[n].checked : fields[n].value !== ''))) {
    form.querySelector('details.advanced').open = true;
  }
  const remember = () =>
    save('analyse.fields', Object.fromEntries(Object.entries(fields).map(([n, el]) => [n, el.type === 'checkbox' ? el.checked : el.value])));
  form.addEventListener('change', remember);
  text.addEventListener('input', () => save('analyse.text', text.value));

  function input() {
    if (mode.get() === 'text') {
      if (!text.value.trim()) throw new FieldError(text, 'Enter a text to analyse.');
      return { text: text.value };
    }
    const messages = chat.get();
    const empty = messages.findIndex((m) => !m.content.trim());
    if (empty >= 0) {
      throw new FieldError(form.querySelectorAll('#analyse-chat textarea')[empty], `Message ${empty + 1} is empty.`);
    }
    return { messages };
  }

  function options(chatMode) {
    const o = {
      optimize_explanations_config: { best_of_k: numberOf(fields.k, { integer: true }) },
      temperature: numberOf(fields.temperature),
      seed: numberOf(fields.seed, { integer: true }),
      calculate_token_salience: fields.salience.checked,
      calculate_salience: fields.salience.checked,
      no_kl: !fields.kl.checked,
      logit_lens_analysis: fields.lens.checked,
    };
    const batch = numberOf(fields.batch, { optional: true, integer: true });
    if (batch !== null) o.batch_size = batch;
    if (chatMode) {
      const lastN = numberOf(fields.lastN, { optional: true, integer: true });
      if (lastN !== null) o.last_n_messages = lastN;
    }
    if (fields.add.value) o.add_tokens = [fields.add.value];
    if (fields.left.value) o.replace_left = fields.left.value;
    if (fields.right.value) o.replace_right = fields.right.value;
    if (fields.hard.checked) o.do_hard_tokens = true;
    if (fields.vectors.checked) o.return_vectors = true;
    return o;
  }

  function submit() {
    errors.clear();
    try {
      const request = { input: input(), options: options(mode.get() === 'chat'), modelId: store.get('modelId') };
      onSubmit(request);
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

  return {
    submit,
    /** Fill the form (from a generated completion, or "analyse again"). */
    setInput(value) {
      if (value.messages) {
        chat.set(value.messages);
        mode.set('chat');
      } else {
        text.value = value.text;
        save('analyse.text', text.value);
        mode.set('text');
      }
    },
  };
}
