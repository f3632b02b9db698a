// A chat-messages editor: one row per message (role + content), add, remove and reorder with buttons that
// keep keyboard focus on the moved message. (Ctrl+Enter is the enclosing form's.)
import { h, clear } from '../dom.js';

const ROLES = ['system', 'user', 'assistant'];

export function createChatEditor(container, { name, onChange = () => {} }) {
  let messages = [{ role: 'user', content: '' }];

  function changed() {
    onChange(messages);
  }

  function render(focus) {
    clear(container);
    const list = h('ol', { class: 'messages' });
    messages.forEach((message, i) => {
      const n = i + 1;
      const role = h(
        'select',
        { 'aria-label': `Role of message ${n}`, class: 'role', 'data-role': n },
        ROLES.map((r) => h('option', { value: r, selected: r === message.role }, r)),
      );
      role.addEventListener('change', () => {
        message.role = role.value;
        changed();
      });
      const content = h('textarea', {
        rows: 2,
        spellcheck: 'false',
        'aria-label': `Content of message ${n} (${message.role})`,
        class: 'content',
        placeholder: message.role === 'assistant' ? 'The reply to analyse or continue' : 'Message',
        value: message.content,
      });
      content.addEventListener('input', () => {
        message.content = content.value;
        changed();
      });
      const tool = (label, text, action, disabled) =>
        h('button', { type: 'button', class: 'ghost small icon', 'aria-label': `${label} message ${n}`, title: `${label}`, disabled, onclick: action }, text);
      list.append(
        h(
          'li',
          { class: `message role-${message.role}` },
          role,
          content,
          h(
            'div',
            { class: 'message-tools' },
            tool('Move up', '↑', () => move(i, -1), i === 0),
            tool('Move down', '↓', () => move(i, 1), i === messages.length - 1),
            tool('Remove', '✕', () => remove(i), messages.length === 1),
          ),
        ),
      );
    });
    const add = h('button', { type: 'button', class: 'secondary small', onclick: addMessage }, '+ Add message');
    container.append(list, add);
    if (focus) {
      const [index, what] = focus;
      const item = list.children[Math.max(0, Math.min(index, messages.length - 1))];
      let target = what === 'content' ? item.querySelector('textarea') : item.querySelector(`button[aria-label^="${what}"]`);
      // a message moved to an end: its other move button (the one pressed is now disabled)
      if (!target || target.disabled) target = item.querySelector('button[aria-label^="Move"]:not(:disabled)') || item.querySelector('textarea');
      target.focus();
    }
  }

  function move(i, delta) {
    const j = i + delta;
    [messages[i], messages[j]] = [messages[j], messages[i]];
    render([j, delta < 0 ? 'Move up' : 'Move down']);
    changed();
  }

  function remove(i) {
    messages.splice(i, 1);
    render([i, 'content']);
    changed();
  }

  function addMessage() {
    const last = messages[messages.length - 1];
    messages.push({ role: last && last.role === 'user' ? 'assistant' : 'user', content: '' });
    render([messages.length - 1, 'content']);
    changed();
  }

  render();
  return {
    get: () => messages.map((m) => ({ role: m.role, content: m.content })),
    set(next) {
      messages = next.length ? next.map((m) => ({ role: ROLES.includes(m.role) ? m.role : 'user', content: String(m.content ?? '') })) : [{ role: 'user', content: '' }];
      render();
      changed();
    },
    name,
  };
}
