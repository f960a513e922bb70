// placeholder: written in issue 5
