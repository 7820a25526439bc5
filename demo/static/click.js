// Each Generate stores the click time and the preview's current image (TAB: the tab's id).
(...args) => { const img = document.querySelector('#preview-TAB img');
  window.sfRun = {tab: 'TAB', t0: performance.now(), src: img ? img.src : null, reported: false}; return args; }
