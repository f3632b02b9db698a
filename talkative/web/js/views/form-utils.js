// Small helpers shared by the input forms: the text/chat switch, numbers with range checks, inline errors.
import { $$, h } from '../dom.js';

export function modeSwitch(form, radioName, onChange = () => {}) {
  const radios = $$(`input[name="${radioName}"]`, form);
  const apply = () => {
    const mode = radios.find((r) => r.checked)?.value || 'text';
    for (const el of $$('[data-mode]', form)) el.hidden = el.dataset.mode !== mode;
    onChange(mode);
  };
  radios.forEach((r) => r.addEventListener('change', apply));
  return {
    get: () => radios.find((r) => r.checked)?.value || 'text',
    set(mode) {
      radios.forEach((r) => (r.checked = r.value === mode));
      apply();
    },
  };
}

export class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

/** The number in an input, checked against its min/max/step; null when empty and allowed. */
export function numberOf(input, { optional = false, integer = false } = {}) {
  const label = input.labels?.[0]?.textContent.trim() || input.id;
  const raw = input.value.trim();
  if (raw === '') {
    if (optional) return null;
    throw new FieldError(input, `${label}: enter a number.`);
  }
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new FieldError(input, `${label}: “${raw}” is not a number.`);
  if (integer && !Number.isInteger(value)) throw new FieldError(input, `${label}: use a whole number.`);
  if (input.min !== '' && value < Number(input.min)) throw new FieldError(input, `${label}: at least ${input.min}.`);
  if (input.max !== '' && value > Number(input.max)) throw new FieldError(input, `${label}: at most ${input.max}.`);
  return value;
}

/** Show a form's validation problem next to its button and mark the field. */
export function formError(form) {
  const box = h('p', { class: 'form-error', role: 'alert', hidden: true });
  form.querySelector('.actions').after(box);
  let marked = null;
  return {
    show(err) {
      if (marked) marked.removeAttribute('aria-invalid');
      box.textContent = err.message;
      box.hidden = false;
      if (err.field) {
        marked = err.field;
        marked.setAttribute('aria-invalid', 'true');
        const details = marked.closest('details');
        if (details) details.open = true;
        marked.focus();
      }
    },
    clear() {
      if (marked) marked.removeAttribute('aria-invalid');
      marked = null;
      box.hidden = true;
      box.textContent = '';
    },
  };
}

export function ctrlEnter(root, action) {
  root.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      action();
    }
  });
}
