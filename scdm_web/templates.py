"""Jinja2 templates of the server-rendered pages (kept in the package: no files to ship, no CDN)."""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

from scdm_eval._html import CSS

BASE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }} · scdm</title>
<style>{{ css }}
header{display:flex;gap:1.2rem;align-items:baseline;border-bottom:1px solid #ddd;padding-bottom:.4rem}
header b{font-size:1.2rem}.err{background:#fdecea;border:1px solid #f5c2c0;padding:.6rem 1rem;border-radius:4px}
.ok{background:#e8f5e9;border:1px solid #b7dfb9;padding:.6rem 1rem;border-radius:4px}
form.filters label{margin-right:.8rem}progress{width:24rem;height:1.2rem}
</style></head><body>
<header><b>scdm</b><a href="/">datasets &amp; models</a><a href="/leaderboard">leaderboard</a>
<a href="/figures">figures</a><a href="/predict">predict</a><a href="/jobs">jobs</a></header>
<main>{% block main %}{% endblock %}</main>
<p class="note">store <code>{{ store }}</code> · results <code>{{ results }}</code></p>
</body></html>"""

INDEX = """{% extends "base.html" %}{% block main %}
<h1>Datasets</h1>
<table id="datasets"><thead><tr><th>dataset</th><th>cells</th><th>genes</th><th>sensitive</th><th>resistant</th>
<th>unlabelled</th><th>studies</th><th>source</th><th>input hash</th><th>created</th></tr></thead><tbody>
{% for d in datasets %}<tr><td>{{ d.name }}</td><td class="num">{{ d.cells }}</td><td class="num">{{ d.genes }}</td>
<td class="num">{{ d.sensitive }}</td><td class="num">{{ d.resistant }}</td><td class="num">{{ d.unlabelled }}</td>
<td>{{ d.studies }}</td><td>{{ d.source }}</td><td><code>{{ d.input_hash }}</code></td><td>{{ d.created }}</td></tr>
{% endfor %}</tbody></table>
<h1>Models</h1>
{{ compute | safe }}
<p class="note">telemetry of each extraction (cells/s, peak memory, device, wall time) as recorded in the store</p>
{% endblock %}"""

LEADERBOARD = """{% extends "base.html" %}{% block main %}
<h1>Leaderboard</h1>
<form class="filters" method="get" action="/leaderboard">
{% for name, options, current in filters %}<label>{{ name }}
<select name="{{ name }}">{% if name != "metric" %}<option value="">(all)</option>{% endif %}
{% for o in options %}<option value="{{ o }}"{% if o == current %} selected{% endif %}>{{ o }}</option>{% endfor %}
</select></label>{% endfor %}<button type="submit">apply</button></form>
<p class="note">ranked by mean {{ metric_label }} over folds ({{ direction }}); mean ± s.d. [95% t-CI]</p>
{{ table | safe }}
{% if not rows %}<p class="err">no results match these filters</p>{% endif %}
{% endblock %}"""

FIGURES = """{% extends "base.html" %}{% block main %}
<h1>Figures</h1>
<form class="filters" method="get" action="/figures">
{% for name, options, current in filters %}<label>{{ name }}
<select name="{{ name }}">{% if name != "metric" %}<option value="">(all)</option>{% endif %}
{% for o in options %}<option value="{{ o }}"{% if o == current %} selected{% endif %}>{{ o }}</option>{% endfor %}
</select></label>{% endfor %}<button type="submit">apply</button></form>
{% for title, svg in figures %}<figure><figcaption>{{ title }}</figcaption>{{ svg | safe }}</figure>{% endfor %}
{% if not figures %}<p class="err">no results match these filters</p>{% endif %}
<h2>UMAP of the embeddings</h2>
<ul>{% for m in models %}<li><a href="/figures/umap/{{ m }}">{{ m }}</a></li>{% endfor %}</ul>
<p class="note">fitted once per model and cached in the store (a subsample above {{ max_cells }} cells)</p>
{% endblock %}"""

UMAP = """{% extends "base.html" %}{% block main %}
<h1>UMAP: {{ model }}</h1><figure>{{ svg | safe }}</figure>
<p class="note">{{ note }}</p>{% endblock %}"""

PREDICT = """{% extends "base.html" %}{% block main %}
<h1>Predict drug response of your cells</h1>
{% if error %}<div class="err" id="error"><b>error:</b> {{ error }}{% if hint %}<br><b>fix:</b> {{ hint }}{% endif %}</div>{% endif %}
{% if not bundles %}<p class="err">no classifier bundles found: make one with
<code>scdm-eval fit --store STORE --model pca --out {{ results }}/bundles/pca_logreg</code> (or pass --bundles DIR)</p>{% endif %}
<form id="predict" method="post" action="/predict" enctype="multipart/form-data">
<p><label>cells (.h5ad, raw counts, at most {{ max_mb }} MB) <input type="file" name="file" accept=".h5ad" required></label></p>
<p><label>model <select name="model" id="model">{% for m in models %}<option value="{{ m }}">{{ m }}</option>{% endfor %}</select></label>
<label>classifier bundle <select name="bundle" id="bundle">{% for key, b in bundles %}
<option value="{{ key }}" data-model="{{ b.model }}">{{ key }} ({{ b.model }}, {{ b.classifier }}, {{ b.n_cells }} training cells)</option>
{% endfor %}</select></label></p>
{% if token_required %}<p><label>access token <input type="password" name="token" required></label></p>{% endif %}
<p><button type="submit">upload and predict</button></p></form>
<p class="note">the bundle's model embeds the cells (pca/hvg reuse the store's fitted genes and basis), then its
classifier predicts P(sensitive) per cell. Files are stored under generated names.</p>
<script>
(function(){var m=document.getElementById('model'),b=document.getElementById('bundle');
function sync(){var first=null;for(var i=0;i<b.options.length;i++){var o=b.options[i],ok=o.dataset.model===m.value;
o.hidden=!ok;if(ok&&first===null)first=i;}if(first!==null&&b.options[b.selectedIndex].hidden)b.selectedIndex=first;}
m.addEventListener('change',sync);sync();})();
</script>
{% endblock %}"""

JOB = """{% extends "base.html" %}{% block main %}
<h1>Job {{ job.id }}</h1>
<p>{{ upload.original_name }} ({{ upload.n_cells }} cells x {{ upload.n_genes }} genes) · model {{ job.model }} ·
bundle {{ job.bundle }}</p>
<p><progress id="progress" max="1" value="{{ job.progress }}"></progress> <span id="stage">{{ job.stage }}</span></p>
<div id="result">{% if job.status == "done" %}<p class="ok">{{ job.n_cells }} cells: {{ job.n_sensitive }} predicted
sensitive. <a id="download" href="/jobs/{{ job.id }}/predictions.csv">download predictions (CSV)</a></p>
{% elif job.status == "failed" %}<div class="err" id="error"><b>error:</b> {{ job.message }}
{% if job.hint %}<br><b>fix:</b> {{ job.hint }}{% endif %}</div>{% endif %}</div>
<script>
(function(){var id={{ job.id }},done={{ 'true' if job.status in ('done', 'failed') else 'false' }};
function esc(s){var d=document.createElement('div');d.textContent=s;return d.innerHTML;}
function poll(){fetch('/api/jobs/'+id,{credentials:'same-origin'}).then(function(r){return r.json();}).then(function(j){
document.getElementById('progress').value=j.progress;document.getElementById('stage').textContent=j.stage;
var r=document.getElementById('result');
if(j.status==='done'){r.innerHTML='<p class="ok">'+j.n_cells+' cells: '+j.n_sensitive+' predicted sensitive. '+
'<a id="download" href="'+j.download+'">download predictions (CSV)</a></p>';return;}
if(j.status==='failed'){r.innerHTML='<div class="err" id="error"><b>error:</b> '+esc(j.message)+
(j.hint?'<br><b>fix:</b> '+esc(j.hint):'')+'</div>';return;}
setTimeout(poll,400);}).catch(function(){setTimeout(poll,1000);});}
if(!done)poll();})();
</script>{% endblock %}"""

JOBS = """{% extends "base.html" %}{% block main %}
<h1>Jobs</h1><table id="jobs"><thead><tr><th>job</th><th>file</th><th>model</th><th>bundle</th><th>status</th>
<th>cells</th><th>created</th><th>finished</th></tr></thead><tbody>
{% for j, u in jobs %}<tr><td><a href="/jobs/{{ j.id }}">{{ j.id }}</a></td><td>{{ u.original_name }}</td><td>{{ j.model }}</td>
<td>{{ j.bundle }}</td><td>{{ j.status }}</td><td class="num">{{ j.n_cells }}</td><td>{{ j.created }}</td>
<td>{{ j.finished or "" }}</td></tr>{% endfor %}</tbody></table>{% endblock %}"""

ERROR = """{% extends "base.html" %}{% block main %}
<h1>{{ heading }}</h1><div class="err" id="error"><b>error:</b> {{ error }}{% if hint %}<br><b>fix:</b> {{ hint }}{% endif %}</div>
{% endblock %}"""

TEMPLATES = {"base.html": BASE, "index.html": INDEX, "leaderboard.html": LEADERBOARD, "figures.html": FIGURES,
             "umap.html": UMAP, "predict.html": PREDICT, "job.html": JOB, "jobs.html": JOBS, "error.html": ERROR}


def environment() -> Environment:
    """The Jinja2 environment of the app (autoescaped HTML)."""
    env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True))
    env.globals["css"] = CSS
    return env


__all__ = ["TEMPLATES", "environment"]
