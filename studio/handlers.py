"""Studio event handlers: typed module-level functions from plain values to plain values (no browser needed).

The Gradio wiring in `studio/app.py` only connects widgets to these. They live in one module per tab
(`studio.common`, `data_tab`, `packing_tab`, `config_tab`, `train_tab`, `chat_tab`); this module gathers them, so
`from studio import handlers as H; H.preview_sample(...)` keeps working. Everything that decides what is trained
goes through `backend.documents` (prepare's own per-row code): the preview shows what prepare writes.
"""

from __future__ import annotations

from studio.chat_tab import (  # noqa: F401
    _models,
    _text_of,
    chat_models,
    chat_stream,
    default_chat_model,
    get_model,
)
from studio.common import (  # noqa: F401
    _HUB_ID,
    APPENDED,
    CHOSEN,
    COLOR_MAP,
    DEFAULT_PREPARE_YAML,
    DEFAULT_TRAIN_YAML,
    MASKED,
    REJECTED,
    TOKEN_VIEW_LIMIT,
    TRAINED,
    DataSettings,
    PathCheck,
    _chat_section,
    _columns,
    _dataset_section,
    _load_lock,
    _load_once,
    _lock,
    _parse_yaml,
    _readers,
    _Rows,
    _stamp,
    _template_arg,
    _tokenizers,
    _unescape,
    check_path,
    default_prepare,
    default_template,
    get_reader,
    get_rows,
    get_tokenizer,
    make_masking,
    prepare_config_of,
    prepared_row,
    problems_markdown,
    read_text,
    warm_up,
)
from studio.config_tab import (  # noqa: F401
    default_train_yaml,
    form_to_train_yaml,
    load_yaml_file,
    memory_plan_markdown,
    plan_pending,
    prepare_yaml_from,
    save_yaml,
    train_yaml_to_form,
)
from studio.data_tab import (  # noqa: F401
    _TOKEN_CSS,
    _VISIBLE,
    CheckResult,
    Preview,
    _cut_lines,
    _fast_path_line,
    _long_mode_lines,
    _preview_from,
    _sample_indices,
    char_labels,
    check_whole_dataset,
    preview_sample,
    runs_of,
    step_index,
    token_html,
)
from studio.packing_tab import (  # noqa: F401
    PackingView,
    _MemoryDocs,
    packing_view,
    tokenize_documents,
)
from studio.train_tab import (  # noqa: F401
    LOG_TAIL_LINES,
    RunView,
    _events_of,
    _past_cache,
    experiment_dir_of,
    launch_run,
    past_runs,
    poll_run,
    prepared_is_current,
    stop_run,
)
