"""The named chat templates of mergekit YAML merges (`chat_template: <name>`, mergekit_yaml.chat_template_text).

    CHAT_TEMPLATES["llama3"]     # Jinja text, written into the merged model's tokenizer_config.json

Each template renders, as transformers renders chat templates (jinja2 ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks; variables messages, add_generation_prompt, bos_token, eos_token), exactly the text of
mergekit 0.1.5's template of the same name (mergekit/_data/chat_templates/<name>.jinja), whitespace included:
mergekit's files leak their line breaks and indentation into the render, and these reproduce that. Checked
against tests/golden/mergekit_0.1.5/chat_templates.json (scripts/mergekit_chat_goldens.py).

chatml    per message    '<|im_start|>' role '\\n' content '<|im_end|>\\n'
          prompt         '<|im_start|>assistant\\n'
llama3    per message    [bos_token before the first] '<|start_header_id|>' role '<|end_header_id|>\\n\\n'
                         content.strip() '<|eot_id|>\\n'           (a newline after every <|eot_id|>)
          prompt         '<|start_header_id|>assistant<|end_header_id|>\\n\\n'
alpaca    first          the last system message's content.strip() (or nothing), then '\\n\\n' (even without one)
          user           '### Instruction:\\n' content.strip()
          user_context   '### Input:\\n' content.strip()
          assistant      '### Response:\\n' content.strip()
                         each of the three followed by '\\n\\n' unless it is the last message of the list;
                         other roles (system, tool, ...) render nothing
          prompt         '### Response:\\n', right after the last content (no blank line), and only when the last
                         message is not the assistant's
mistral   first          bos_token (as Jinja prints it: absent '', None 'None'); a first system message is
                         taken out of the turns
          user           ' [INST] ' content ' [/INST]'; the first turn ' [INST] ' system '\\n\\n' content ' [/INST]'
                         (also for an empty system content)
          assistant      ' ' content eos_token
                         turns alternate user/assistant/..., starting with user; no prompt (add_generation_prompt
                         changes nothing)
exaone    first          '        [|system|][|endofturn|]\\n\\n' when the first message is not a system message
          per message    '    [|' role '|]' content '\\n', then '        \\n\\n' (user) or
                         '        [|endofturn|]\\n\\n' (any other role)
          prompt         '    [|assistant|]\\n'
          (the 4 and 8 spaces and the doubled newlines are mergekit's template indentation, rendered as text)

Content is used as given (chatml, mistral, exaone) or through Jinja's `trim` filter (llama3, alpaca: a missing
content renders '', None renders 'None', a list renders its Python repr, as in mergekit). Errors: these fail in
exactly the cases where mergekit's templates fail, listed below, by calling raise_exception with a message naming
the template ('llama3 chat template: message 0 needs a string role'; a jinja2 TemplateError in transformers). That
is the one difference: mergekit's fail there with a bare TypeError ('can only concatenate str (not "NoneType") to
str'), an UndefinedError or, for mistral's role order, raise_exception messages of their own.

    chatml, exaone   a message whose role or content is not a string (missing, None, a list of parts)
    llama3           a message whose role is not a string; bos_token not a string (with at least one message)
    alpaca           add_generation_prompt with no messages
    mistral          no messages; turns not alternating user/assistant from user, or another role; a turn's
                     content not a string; the system content not a string (None; a missing one is no system,
                     as in mergekit) when there is a first turn; eos_token not a string after an assistant turn

Outside these cases the renders are the same for any messages, also where mergekit's output is odd (alpaca's
prompt glued to the last answer, exaone's indentation): the merged model behaves as mergekit's would.
"""
from __future__ import annotations

# Each template is one Jinja string whose tags all strip the whitespace before them ('{%-', '{{-'), so the line
# breaks below are layout only; the rendered whitespace is spelled out in string literals.

_CHATML = r"""
{%- for message in messages %}
  {%- if message['role'] is not string or message['content'] is not string %}
    {{- raise_exception('chatml chat template: message ' ~ loop.index0 ~ ' needs a string role and content') }}
  {%- endif %}
  {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

_LLAMA3 = r"""
{%- for message in messages %}
  {%- if message['role'] is not string %}
    {{- raise_exception('llama3 chat template: message ' ~ loop.index0 ~ ' needs a string role') }}
  {%- endif %}
  {%- if loop.first %}
    {%- if bos_token is not string %}
      {{- raise_exception('llama3 chat template: bos_token must be a string') }}
    {%- endif %}
    {{- bos_token }}
  {%- endif %}
  {{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' }}
  {{- message['content'] | trim }}
  {{- '<|eot_id|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

_ALPACA = r"""
{%- set systems = messages | selectattr('role', 'equalto', 'system') | list %}
{%- if systems %}
  {{- systems[-1]['content'] | trim }}
{%- endif %}
{{- '\n\n' }}
{%- for message in messages %}
  {%- if message['role'] in ['user', 'user_context', 'assistant'] %}
    {%- if message['role'] == 'user' %}
      {{- '### Instruction:\n' }}
    {%- elif message['role'] == 'user_context' %}
      {{- '### Input:\n' }}
    {%- else %}
      {{- '### Response:\n' }}
    {%- endif %}
    {{- message['content'] | trim }}
    {%- if not loop.last %}
      {{- '\n\n' }}
    {%- endif %}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {%- if not messages %}
    {{- raise_exception('alpaca chat template: add_generation_prompt needs at least one message') }}
  {%- endif %}
  {%- if messages[-1]['role'] != 'assistant' %}
    {{- '### Response:\n' }}
  {%- endif %}
{%- endif %}"""

_MISTRAL = r"""
{%- if not messages %}
  {{- raise_exception('mistral chat template: there are no messages') }}
{%- endif %}
{%- set leading_system = messages[0]['role'] == 'system' %}
{%- set turns = messages[1:] if leading_system else messages %}
{%- set has_system = leading_system and messages[0]['content'] is defined %}
{{- bos_token }}
{%- for message in turns %}
  {%- if message['role'] not in ['user', 'assistant'] %}
    {{- raise_exception('mistral chat template: roles are user and assistant after an optional first system '
                        'message, got ' ~ message['role'] ~ ' in turn ' ~ loop.index0) }}
  {%- endif %}
  {%- if message['role'] != ('user' if loop.index0 is even else 'assistant') %}
    {{- raise_exception('mistral chat template: turns must alternate user/assistant starting with user, got '
                        ~ message['role'] ~ ' in turn ' ~ loop.index0) }}
  {%- endif %}
  {%- if message['content'] is not string %}
    {{- raise_exception('mistral chat template: the content of turn ' ~ loop.index0 ~ ' is not a string') }}
  {%- endif %}
  {%- if message['role'] == 'user' %}
    {{- ' [INST] ' }}
    {%- if loop.first and has_system %}
      {%- if messages[0]['content'] is not string %}
        {{- raise_exception('mistral chat template: the system message content is not a string') }}
      {%- endif %}
      {{- messages[0]['content'] ~ '\n\n' }}
    {%- endif %}
    {{- message['content'] ~ ' [/INST]' }}
  {%- else %}
    {%- if eos_token is not string %}
      {{- raise_exception('mistral chat template: eos_token must be a string') }}
    {%- endif %}
    {{- ' ' ~ message['content'] ~ eos_token }}
  {%- endif %}
{%- endfor %}"""

_EXAONE = r"""
{%- for message in messages %}
  {%- if message['role'] is not string or message['content'] is not string %}
    {{- raise_exception('exaone chat template: message ' ~ loop.index0 ~ ' needs a string role and content') }}
  {%- endif %}
  {%- if loop.first and message['role'] != 'system' %}
    {{- '        [|system|][|endofturn|]\n\n' }}
  {%- endif %}
  {{- '    [|' ~ message['role'] ~ '|]' ~ message['content'] ~ '\n' }}
  {{- '        \n\n' if message['role'] == 'user' else '        [|endofturn|]\n\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '    [|assistant|]\n' }}
{%- endif %}"""

CHAT_TEMPLATES = {name: text.strip() for name, text in (
    ("chatml", _CHATML), ("llama3", _LLAMA3), ("alpaca", _ALPACA), ("mistral", _MISTRAL), ("exaone", _EXAONE))}
